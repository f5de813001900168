// The report page's only script. It takes no data from Python (tags come from escaped data- attributes and
// it writes only with textContent), so its text is fixed; the page's Content-Security-Policy names its sha256.
(function () {
  "use strict";
  var body = document.body;
  var grid = document.getElementById("gallery");
  var items = grid ? Array.prototype.slice.call(grid.querySelectorAll(".item")) : [];
  var box = document.getElementById("filter");
  var failedOnly = document.getElementById("failed-only");
  var shown = document.getElementById("shown");
  var noMatch = document.getElementById("no-match");
  var tagsOf = items.map(function (el) {
    try {
      var t = JSON.parse(el.getAttribute("data-tags") || "[]");
      return Array.isArray(t) ? t.map(String) : [];
    } catch (err) { return []; }
  });
  var exact = null;

  function apply() {
    var q = box ? box.value.trim().toLowerCase() : "";
    var n = 0;
    items.forEach(function (el, i) {
      var tags = tagsOf[i];
      var ok = exact !== null ? tags.indexOf(exact) >= 0
        : (q === "" || tags.some(function (t) { return t.toLowerCase().indexOf(q) >= 0; }));
      if (failedOnly && failedOnly.checked && el.getAttribute("data-status") !== "failed") { ok = false; }
      el.hidden = !ok;
      if (ok) { n++; }
    });
    if (shown) { shown.textContent = n + " of " + items.length; }
    if (noMatch) { noMatch.hidden = n !== 0 || items.length === 0; }
    Array.prototype.forEach.call(document.querySelectorAll(".tag[data-tag]"), function (el) {
      el.classList.toggle("active", exact !== null && el.getAttribute("data-tag") === exact);
    });
    body.setAttribute("data-shown", String(n));
    body.setAttribute("data-filter", exact !== null ? exact : q);
  }

  function remember(hash) {
    try { history.replaceState(null, "", hash || location.pathname + location.search); } catch (err) { /* file: */ }
  }

  function setTag(tag, scroll) {
    exact = tag;
    if (box) { box.value = tag === null ? "" : tag; }
    apply();
    remember(tag === null ? "" : "#tag=" + encodeURIComponent(tag));
    if (scroll && grid) { document.getElementById("gallery-section").scrollIntoView(); }
  }

  document.addEventListener("click", function (ev) {
    var el = ev.target && ev.target.closest ? ev.target.closest("[data-tag]") : null;
    if (!el) { return; }
    ev.preventDefault();
    var tag = el.getAttribute("data-tag");
    var inGallery = grid && grid.contains(el);
    setTag(exact === tag ? null : tag, !inGallery);
  });
  if (box) {
    box.addEventListener("input", function () {
      exact = null;
      apply();
      remember(box.value ? "#q=" + encodeURIComponent(box.value) : "");
    });
  }
  if (failedOnly) { failedOnly.addEventListener("change", apply); }
  var clear = document.getElementById("clear");
  if (clear) {
    clear.addEventListener("click", function () {
      if (failedOnly) { failedOnly.checked = false; }
      setTag(null, false);
    });
  }

  var hash = location.hash || "";
  try {
    if (hash.indexOf("#tag=") === 0) {
      exact = decodeURIComponent(hash.slice(5));
      if (box) { box.value = exact; }
    } else if (hash.indexOf("#q=") === 0 && box) {
      box.value = decodeURIComponent(hash.slice(3));
    } else if (hash === "#failed" && failedOnly) {
      failedOnly.checked = true;
    }
  } catch (err) { exact = null; }
  apply();
  body.setAttribute("data-items", String(items.length));
  body.setAttribute("data-ready", "1");
})();
