/* expertscope report: sortable and filterable tables, a domain selector and heatmap hover values.
   Plain JavaScript, no library, no network. Inlined into report.html and compare.html by report/html.py.
   Markup it works on (written by html.py):
     div.xt > .xt-bar (input.xt-q, span.xt-n, button.xt-more) + table.tbl (th[data-col][data-num], td[data-v])
     any element with data-domain (table rows, heatmap figures, findings, reading lines)
     svg.hm with data-rows/cols/rname/cname/vname/unit/fname/cw/ch > rect[data-v][data-f] */
(function () {
  "use strict";
  var D = document;
  var each = function (list, f) { Array.prototype.forEach.call(list, f); };

  // Images: mark each decoded one, so a headless browser can check the page rendered.
  function markImages() {
    var ok = 0;
    each(D.images, function (im) {
      var good = im.complete && im.naturalWidth > 0;
      if (good) ok++;
      im.setAttribute("data-loaded", good ? "1" : "0");
    });
    D.body.setAttribute("data-images-ok", ok + "/" + D.images.length);
  }

  // The domain selector: "" shows every domain.
  var select = D.getElementById("domain-select");
  function domain() { return select ? select.value : ""; }
  function inDomain(el) {
    var d = domain();
    return !d || !el.hasAttribute("data-domain") || el.getAttribute("data-domain") === d;
  }

  // A cell's value: its full-precision number (data-v) or its lower-case text; null when empty.
  function value(td) {
    if (!td) return null;
    var v = td.getAttribute("data-v");
    if (v !== null && v !== "") { var f = parseFloat(v); if (!isNaN(f)) return f; }
    var s = td.textContent.trim().toLowerCase();
    return s === "" || s === "\u2013" ? null : s;
  }

  // Filter terms: words (each must appear in the row), or column=value, column!=value, column>x, <, >=, <=
  // (spaces around the operator are allowed). A term naming no column of the table, or comparing a column
  // with something that is not a number, is an error: said under the box, and left out of the filter.
  function terms(query, columns) {
    var q = query.toLowerCase().replace(/\s*(>=|<=|!=|=|>|<)\s*/g, "$1");
    return q.split(/\s+/).filter(Boolean).map(function (t) {
      var m = /^([^<>=!]*)(>=|<=|!=|=|>|<)(.*)$/.exec(t);
      if (!m) return { word: t };
      var c = columns.indexOf(m[1]);
      if (!m[1] || c < 0) return { error: "no column '" + m[1] + "' in this table (columns: " +
                                   columns.filter(Boolean).join(", ") + ")" };
      if (m[2].charAt(0) !== "=" && m[2] !== "!=" && (m[3] === "" || isNaN(parseFloat(m[3]))))
        return { error: "'" + t + "': " + m[2] + " needs a number" };
      if (m[3] === "") return { error: "'" + t + "': give a value after " + m[2] };
      return { col: c, op: m[2], v: m[3] };
    });
  }
  function matches(tr, ts) {
    for (var i = 0; i < ts.length; i++) {
      var t = ts[i];
      if (t.error !== undefined) continue;
      if (t.word !== undefined) {
        if (tr.textContent.toLowerCase().indexOf(t.word) < 0) return false;
        continue;
      }
      var td = tr.cells[t.col], a = value(td), b = parseFloat(t.v);
      var text = td ? td.textContent.trim().toLowerCase() : "";
      var numeric = typeof a === "number" && !isNaN(b);
      var equal = numeric ? a === b : text === t.v;
      if (t.op === "=" && !equal) return false;
      if (t.op === "!=" && equal) return false;
      if (t.op.charAt(0) === ">" || t.op.charAt(0) === "<") {
        if (!numeric) return false;
        if ((t.op === ">" && !(a > b)) || (t.op === "<" && !(a < b)) ||
            (t.op === ">=" && !(a >= b)) || (t.op === "<=" && !(a <= b))) return false;
      }
    }
    return true;
  }

  function columns(box) {
    return Array.prototype.map.call(box.querySelectorAll("thead th"), function (th) {
      return (th.getAttribute("data-col") || "").toLowerCase();
    });
  }

  // Show the rows that pass the domain and the filter: the first `data-page` of them, or all.
  function refresh(box) {
    var q = box.querySelector(".xt-q"), ts = terms(q ? q.value : "", columns(box));
    var page = parseInt(box.getAttribute("data-page"), 10) || 20, all = box.getAttribute("data-all") === "1";
    var rows = box.querySelectorAll("tbody tr"), n = 0, shown = 0;
    each(rows, function (r) {
      var m = inDomain(r) && matches(r, ts);
      if (m) n++;
      var visible = m && (all || n <= page);
      r.hidden = !visible;
      if (visible) shown++;
    });
    var errors = ts.filter(function (t) { return t.error !== undefined; }).map(function (t) { return t.error; });
    box.querySelector(".xt-n").textContent = (errors.length ? "filter: " + errors.join("; ") + ". " : "") +
      "showing " + shown + " of " + n + " rows" + (n < rows.length ? " (" + rows.length + " in all)" : "");
    box.classList.toggle("xt-bad", errors.length > 0);
    var more = box.querySelector(".xt-more");
    more.hidden = n <= page;
    more.textContent = all ? "show " + page + " rows" : "show all " + n;
  }

  // Sort by a column: numbers first click largest first, text A to Z; a second click reverses.
  // Empty cells go last; ties keep their order.
  function sortBy(box, th) {
    var ths = box.querySelectorAll("thead th"), c = Array.prototype.indexOf.call(ths, th);
    var cur = th.getAttribute("aria-sort");
    var dir = (!cur || cur === "none") ? (th.getAttribute("data-num") === "1" ? -1 : 1) : (cur === "ascending" ? -1 : 1);
    each(ths, function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    var body = box.querySelector("tbody");
    var keyed = Array.prototype.map.call(body.rows, function (r, i) { return { r: r, k: value(r.cells[c]), i: i }; });
    keyed.sort(function (a, b) {
      if (a.k === null || b.k === null) return a.k === b.k ? a.i - b.i : (a.k === null ? 1 : -1);
      var x = (typeof a.k === "number" && typeof b.k === "number") ? a.k - b.k
        : String(a.k).localeCompare(String(b.k), undefined, { numeric: true });
      return x !== 0 ? dir * x : a.i - b.i;
    });
    keyed.forEach(function (o) { body.appendChild(o.r); });
    refresh(box);
  }

  function applyDomain() {
    each(D.querySelectorAll("[data-domain]"), function (el) { if (el.tagName !== "TR") el.hidden = !inDomain(el); });
    each(D.querySelectorAll("div.xt"), refresh);
    D.body.setAttribute("data-selected-domain", domain());
  }

  // Heatmap hover: row, column and the cell's value as the tables print it.
  var tip = D.createElement("div");
  tip.id = "tip";
  tip.setAttribute("role", "tooltip");
  tip.hidden = true;
  function tipText(cell) {
    var svg = cell.ownerSVGElement;
    var a = function (k) { return svg.getAttribute("data-" + k) || ""; };
    var col = Math.round(parseFloat(cell.getAttribute("x")) / parseFloat(a("cw")));
    var row = Math.round(parseFloat(cell.getAttribute("y")) / parseFloat(a("ch")));
    return a("rname") + " " + a("rows").split("|")[row] + " \u00b7 " + a("cname") + " " + a("cols").split("|")[col] +
      ": " + a("vname") + " " + cell.getAttribute("data-v") + (a("unit") ? " " + a("unit") : "") +
      (cell.hasAttribute("data-f") ? " (" + a("fname") + ")" : "");
  }
  function hover(ev) {
    var el = ev.target;
    if (el && el.tagName === "rect" && el.hasAttribute("data-v") && el.ownerSVGElement) {
      tip.textContent = tipText(el);
      tip.hidden = false;
      tip.style.left = (ev.pageX + 14) + "px";
      tip.style.top = (ev.pageY + 14) + "px";
    } else if (!tip.hidden) {
      tip.hidden = true;
    }
  }

  function init() {
    D.body.appendChild(tip);
    D.addEventListener("mousemove", hover);
    each(D.querySelectorAll("div.xt"), function (box) {
      var q = box.querySelector(".xt-q");
      if (q) q.addEventListener("input", function () { refresh(box); });
      box.querySelector(".xt-more").addEventListener("click", function () {
        box.setAttribute("data-all", box.getAttribute("data-all") === "1" ? "0" : "1");
        refresh(box);
      });
      each(box.querySelectorAll("thead th"), function (th) {
        th.addEventListener("click", function () { sortBy(box, th); });
        th.addEventListener("keydown", function (ev) {
          if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sortBy(box, th); }
        });
      });
    });
    if (select) select.addEventListener("change", applyDomain);
    applyDomain();
    D.body.setAttribute("data-js", "ready");
  }

  if (D.readyState === "loading") D.addEventListener("DOMContentLoaded", init); else init();
  window.addEventListener("load", markImages);
})();
