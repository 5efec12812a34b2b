"use strict";
// Sorting, folding and filtering for bench's HTML report. Each row of a table is one <tbody> (the row and,
// in the summary, the card folded under it), so a sort moves a row and its card together.
(function () {
  function isMissing(text) {
    return text === "" || text === "—" || text === "n/a";
  }
  function keyOf(body, col) {
    var c = body.rows[0].cells[col];
    var text = c ? c.textContent.trim() : "";
    var num = c && c.dataset.sort ? parseFloat(c.dataset.sort) : NaN;
    return { body: body, text: text, num: num, missing: isMissing(text) };
  }
  function compare(a, b) {
    var an = !isNaN(a.num), bn = !isNaN(b.num);
    if (an && bn) return a.num - b.num;
    if (an !== bn) return an ? -1 : 1;  // numbers before words
    return a.text.localeCompare(b.text, undefined, { numeric: true });
  }
  function sortBy(th) {
    var table = th.closest("table");
    var head = table.tHead.rows[0].cells;
    var col = Array.prototype.indexOf.call(head, th);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    for (var i = 0; i < head.length; i++) head[i].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var keys = Array.prototype.map.call(table.tBodies, function (b) { return keyOf(b, col); });
    keys.sort(function (a, b) {
      if (a.missing !== b.missing) return a.missing ? 1 : -1;  // empty cells last, either way
      var d = compare(a, b);
      return ascending ? d : -d;
    });
    var fragment = document.createDocumentFragment();
    keys.forEach(function (k) { fragment.appendChild(k.body); });
    table.appendChild(fragment);
  }
  function fold(button, open) {
    var card = document.getElementById(button.getAttribute("aria-controls"));
    var show = open === undefined ? card.hidden : open;
    card.hidden = !show;
    button.setAttribute("aria-expanded", String(show));
  }
  document.addEventListener("click", function (e) {
    var th = e.target.closest("table.sortable > thead th");
    if (th) return sortBy(th);
    var button = e.target.closest("button.fold");
    if (button) return fold(button);
    var all = e.target.closest("button.fold-all");
    if (all) {
      var open = all.dataset.open === "true";
      document.getElementById(all.dataset.table).querySelectorAll("button.fold").forEach(function (b) {
        if (!b.closest("tbody").hidden) fold(b, open);
      });
    }
  });
  document.addEventListener("keydown", function (e) {
    var th = e.target.closest && e.target.closest("table.sortable > thead th");
    if (th && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); sortBy(th); }
  });
  document.querySelectorAll("input.filter").forEach(function (input) {
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      var table = document.getElementById(input.dataset.table);
      Array.prototype.forEach.call(table.tBodies, function (b) {
        var text = b.rows[0].textContent.toLowerCase();
        b.hidden = !words.every(function (w) { return text.indexOf(w) >= 0; });
      });
    });
  });
})();
