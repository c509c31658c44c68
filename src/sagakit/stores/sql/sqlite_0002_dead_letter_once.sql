-- A message is parked at most once per endpoint: a relay or consumer that dies after
-- parking and before acknowledging parks it again on redelivery, harmlessly.
CREATE UNIQUE INDEX dead_letters_once ON dead_letters (endpoint, message_id)
    WHERE message_id IS NOT NULL;
