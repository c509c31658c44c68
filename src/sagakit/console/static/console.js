// sagakit console: refresh the page's #content live while what it shows changes.
// The pages work without this script; it only saves the operator a reload. It never
// replaces the content while someone is typing a decision.

// A table wider than the screen scrolls inside its own box (console.css): let the
// keyboard reach it then, so it can be scrolled without a mouse. Wide screens keep
// their tab order untouched.
(function () {
  "use strict";
  function reachable() {
    var tables = document.querySelectorAll("#content table");
    for (var i = 0; i < tables.length; i++) {
      if (tables[i].scrollWidth > tables[i].clientWidth + 1) {
        tables[i].setAttribute("tabindex", "0");
      } else {
        tables[i].removeAttribute("tabindex");
      }
    }
  }
  document.addEventListener("DOMContentLoaded", reachable);
  window.addEventListener("resize", reachable);
  document.addEventListener("console:refreshed", reachable);
})();

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

  // The nav's open-case count sits outside #content: copy it from the fresh page.
  // Returns what changed about it ("" when nothing did).
  function updateCount(doc) {
    var mine = document.querySelector("header nav .nav-count");
    var theirs = doc.querySelector("header nav .nav-count");
    if (!mine || !theirs || mine.outerHTML === theirs.outerHTML) {
      return "";
    }
    mine.replaceWith(document.importNode(theirs, true));
    return theirs.getAttribute("aria-label") || "";
  }

  // A short polite announcement for screen readers (never the whole content). The
  // time makes each one differ, so a repeated update is announced again.
  function announce(extra) {
    var status = document.getElementById("live-status");
    if (!status) {
      return;
    }
    var now = new Date().toTimeString().slice(0, 8);
    status.textContent = "Updated at " + now + (extra ? ": " + extra : "");
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
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("content");
        if (fresh && !editing()) {
          main.innerHTML = fresh.innerHTML;
          document.dispatchEvent(new Event("console:refreshed"));
          announce(updateCount(doc));
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
