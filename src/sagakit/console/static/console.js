// sagakit console: refresh the page's #content live while what it shows changes.
// The pages work without this script; it only saves the operator a reload. It never
// replaces the content while someone is typing a decision.
(function () {
  "use strict";
  var main = document.getElementById("content");
  if (!main || !main.dataset.live || !window.EventSource || !window.fetch) {
    return;
  }
  var indicator = document.getElementById("live-indicator");
  var busy = false;
  var pending = false;
  var ended = false;

  function say(text, state) {
    indicator.hidden = false;
    indicator.textContent = text;
    indicator.className = "live " + state;
  }

  function editing() {
    var active = document.activeElement;
    if (active && main.contains(active) && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName)) {
      return true;
    }
    var boxes = main.querySelectorAll("textarea");
    for (var i = 0; i < boxes.length; i++) {
      if (boxes[i].value.trim() !== "") {
        return true;
      }
    }
    return false;
  }

  function refresh() {
    if (busy || editing()) {
      pending = true;
      if (!busy) {
        say("changed: finish or clear your decision to refresh", "held");
      }
      return;
    }
    busy = true;
    pending = false;
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.ok ? response.text() : ""; })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("content");
        if (fresh && !editing()) {
          main.innerHTML = fresh.innerHTML;
          say(ended ? "final" : "live", ended ? "done" : "on");
        } else if (fresh) {
          pending = true;
        }
      })
      .catch(function () { say("offline", "off"); })
      .then(function () {
        busy = false;
        if (pending) {
          window.setTimeout(refresh, 500);
        }
      });
  }

  var source = new EventSource(main.dataset.live);
  source.addEventListener("open", function () { say("live", "on"); });
  source.addEventListener("error", function () { say("reconnecting", "off"); });
  source.addEventListener("change", function (event) {
    var tag = JSON.parse(event.data).tag;
    if (tag !== main.dataset.tag) {
      main.dataset.tag = tag;
      refresh();
    }
  });
  source.addEventListener("end", function () {
    ended = true;
    source.close();
    say("final", "done");
  });
  main.addEventListener("focusout", function () {
    if (pending) {
      window.setTimeout(refresh, 300);
    }
  });
})();
