// Muster console: small progressive enhancements. Every flow works without this file.
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  // Copy buttons: data-copy="<id of the element whose text to copy>".
  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest("button[data-copy]");
    if (!btn) return;
    var el = document.getElementById(btn.getAttribute("data-copy"));
    if (!el || !navigator.clipboard) return;
    var label = btn.textContent;
    navigator.clipboard.writeText(el.textContent.trim()).then(function () {
      btn.textContent = "Copied";
      setTimeout(function () { btn.textContent = label; }, 1500);
    });
  });

  // Confirmation for destructive forms: data-confirm="question"; data-confirm-cascade is asked
  // instead when the form's "cascade" box is ticked (it names what the cascade removes).
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var q = form.getAttribute && form.getAttribute("data-confirm");
    var cascade = form.querySelector && form.querySelector("input[name=cascade]:checked");
    if (cascade && form.getAttribute("data-confirm-cascade")) q = form.getAttribute("data-confirm-cascade");
    if (q && !window.confirm(q)) ev.preventDefault();
  });

  // JSON editors: validate as the user types; block submit while invalid.
  function checkJson(area) {
    var out = document.getElementById(area.getAttribute("aria-describedby"));
    var text = area.value.trim();
    var msg = "";
    if (text) {
      try {
        var v = JSON.parse(text);
        if (v === null || typeof v !== "object" || Array.isArray(v)) msg = "The initial twin must be a JSON object.";
      } catch (e) { msg = "Not valid JSON: " + e.message; }
    }
    area.setAttribute("aria-invalid", msg ? "true" : "false");
    if (out) out.textContent = msg;
    return !msg;
  }
  document.querySelectorAll("textarea[data-json]").forEach(function (area) {
    area.addEventListener("input", function () { checkJson(area); });
    if (area.form) area.form.addEventListener("submit", function (ev) {
      if (!checkJson(area)) { ev.preventDefault(); area.focus(); }
    });
  });

  // Show only the attestation fields of the chosen mechanism.
  function syncAttestation() {
    var chosen = document.querySelector("input[name=attestation]:checked");
    document.querySelectorAll("fieldset[data-attestation]").forEach(function (fs) {
      fs.hidden = !!chosen && fs.getAttribute("data-attestation") !== chosen.value;
    });
    var auto = document.getElementById("auto_keys");
    document.querySelectorAll("input[data-manual-key]").forEach(function (i) {
      i.disabled = !!auto && auto.checked;
    });
  }
  document.addEventListener("change", function (ev) {
    if (ev.target.name === "attestation" || ev.target.id === "auto_keys") syncAttestation();
  });
  syncAttestation();
  // The overview's live registrations: a Server-Sent Events stream, newest row first.
  var live = document.getElementById("live-registrations");
  if (live && window.EventSource) {
    var rows = live.querySelector("tbody");
    var status = document.getElementById("live-status");
    var say = function (text) { if (status) status.textContent = text; };
    var source = new EventSource(live.getAttribute("data-source"));
    source.addEventListener("registration", function (ev) {
      var e;
      try { e = JSON.parse(ev.data); } catch (x) { return; }
      var tr = document.createElement("tr");
      // Whole seconds, UTC: DPS's 7 fractional digits are noise on a screen.
      [String(e.time).replace(/\.\d+Z$/, "Z").replace("T", " "), e.registrationId, e.outcome, e.hub || "", e.transport, String(e.durationMs),
        e.errorCode == null ? "" : String(e.errorCode)].forEach(function (text) {
        var td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      });
      rows.insertBefore(tr, rows.firstChild);
      while (rows.rows.length > 50) rows.deleteRow(rows.rows.length - 1);
      say("Live.");
    });
    source.addEventListener("lagged", function () {
      say("Live; some registrations were skipped because the view fell behind.");
    });
    source.onopen = function () { say("Live. Waiting for registrations…"); };
    source.onerror = function () { say("The live view lost its connection; reconnecting…"); };
  }
})();
