"""Transports: how messages travel between services (embedded; NATS and RabbitMQ follow)."""
