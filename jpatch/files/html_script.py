"""The script and style every jpatch HTML view inlines (`jpatch.files.html_view`): plain JavaScript
drawing SVG, no library and no network, so a report opens from disk anywhere and stays small.

Each `.jp-root` element holds its panels as JSON (`script.jp-data`); arrays come as base64
little-endian float32 ("f4") or uint8 ("u1") with their shape. Hovering a cell, point or edge fills
the root's tooltip (`.jp-tip`, the number in `.jp-value`); `select` elements pick a prompt, a
leading axis' index, a layer or a head.
"""

STYLE = """
.jp-root{font:13px system-ui,-apple-system,"Segoe UI",sans-serif;color:#222}
.jp-panel{margin:14px 0 22px}.jp-panel h3{font-size:15px;margin:4px 0}
.jp-note{color:#555;margin:2px 0 6px}.jp-row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.jp-grid h4{font-size:13px;margin:2px 0;font-weight:600}.jp-controls{margin:4px 0}
.jp-controls label{margin-right:12px}.jp-tokens{max-width:560px;color:#333;margin-top:4px;word-break:break-all}
.jp-tokens span{background:#f1f1f1;border-radius:3px;margin:0 2px;padding:0 2px;white-space:pre}
.jp-tip{position:fixed;display:none;background:#fff;border:1px solid #888;border-radius:4px;padding:5px 7px;
 font-size:12px;pointer-events:none;box-shadow:0 2px 6px rgba(0,0,0,.2);z-index:10;white-space:pre}
.jp-root svg text{font-size:11px;fill:#333}.jp-root table{border-collapse:collapse}
.jp-root td,.jp-root th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.jp-legend{margin:0 0 4px 20px;font-size:12px;color:#333}.jp-bar{display:inline-block;width:140px;height:10px;
 border:1px solid #bbb;vertical-align:middle}
.jp-cell:hover,.jp-pt:hover{stroke:#000;stroke-width:1.5}.jp-edge:hover{stroke-opacity:1}
"""

SCRIPT = r"""
(function () {
"use strict";
if (window.jpatchView) { window.jpatchView.renderAll(); return; }
var SVG = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent, text, ns) {
  var e = ns ? document.createElementNS(SVG, tag) : document.createElement(tag);
  for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}
function s(tag, attrs, parent, text) { return el(tag, attrs, parent, text, true); }
function decode(p) {
  var bin = atob(p.b64), bytes = new Uint8Array(bin.length);
  for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return p.dtype === "u1" ? bytes : new Float32Array(bytes.buffer);
}
function fmt(v) { return isFinite(v) ? String(+v.toPrecision(6)) : "n/a"; }
function size(shape) { return shape.reduce(function (a, b) { return a * b; }, 1); }
// diverging blue - white - red around `centre`, +-`scale` saturates; sequential white - blue when seq
function colour(v, centre, scale, seq) {
  if (!isFinite(v)) return "#e8e8e8";
  var t = Math.max(-1, Math.min(1, (v - centre) / (scale || 1))), a = Math.abs(t);
  var end = seq || t < 0 ? [33, 102, 172] : [178, 24, 43];
  var mix = function (c) { return Math.round(255 + (c - 255) * a); };
  return "rgb(" + mix(end[0]) + "," + mix(end[1]) + "," + mix(end[2]) + ")";
}
function tipper(root) {
  var tip = el("div", {"class": "jp-tip"}, root);
  return {
    show: function (ev, lines) {
      tip.innerHTML = "";
      lines.forEach(function (l) { var d = el("div", {}, tip); if (l.value !== undefined) {
        d.textContent = l.text + " "; el("span", {"class": "jp-value"}, d, l.value); } else d.textContent = l; });
      tip.style.display = "block";
      tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
      tip.style.top = (ev.clientY + 14) + "px";
    },
    hide: function () { tip.style.display = "none"; }
  };
}
function axisLabel(labels, axis, i) { return labels && labels[axis] && labels[axis][i] !== undefined ? labels[axis][i] : String(i); }
// One heatmap: values[offset + r * cols + c]; g = {rows, cols, rowAxis, colAxis, labels, centre, title, unit}
function drawGrid(box, g, values, offset, extra, tip) {
  box.innerHTML = "";
  if (g.title) el("h4", {}, box, g.title);
  var n = g.rows * g.cols, scale = 0, longest = 0;
  for (var i = 0; i < n; i++) { var v = values[offset + i]; if (isFinite(v)) scale = Math.max(scale, Math.abs(v - g.centre)); }
  scale = g.seq ? 1 : Math.max(scale, 1e-5 * Math.max(1, Math.abs(g.centre)));  // float noise stays white
  for (i = 0; i < g.rows; i++) longest = Math.max(longest, Math.min(16, axisLabel(g.labels, g.rowAxis, i).length));
  var cw = Math.max(14, Math.min(40, Math.floor((g.narrow ? 440 : 640) / g.cols))), ch = 20, left = 26 + 7 * longest, top = 6;
  var colText = g.colAxis === "pos" || g.colAxis === "src" || g.colAxis === "reader";
  var bottom = colText ? 84 : 40, w = left + cw * g.cols + 10, h = top + ch * g.rows + bottom;
  var svg = s("svg", {width: w, height: h, "class": "jp-heatmap"}, box);
  for (var r = 0; r < g.rows; r++) {
    var rl = axisLabel(g.labels, g.rowAxis, r);
    s("text", {x: left - 4, y: top + ch * r + 14, "text-anchor": "end"}, svg, rl.length > 16 ? rl.slice(0, 15) + "\u2026" : rl);
    for (var c = 0; c < g.cols; c++) {
      var k = r * g.cols + c, val = values[offset + k];
      s("rect", {x: left + cw * c, y: top + ch * r, width: cw - 1, height: ch - 1, fill: colour(val, g.centre, scale, g.seq),
                 "class": "jp-cell", "data-r": r, "data-c": c, "data-v": fmt(val)}, svg);
    }
  }
  for (c = 0; c < g.cols; c++) {
    var x = left + cw * c + cw / 2, y = top + ch * g.rows + 10, lab = axisLabel(g.labels, g.colAxis, c);
    s("text", colText ? {x: x, y: y, transform: "rotate(-50 " + x + " " + y + ")", "text-anchor": "end", dy: "0.7em"}
                      : {x: x, y: y + 4, "text-anchor": "middle"}, svg, lab.length > 14 ? lab.slice(0, 13) + "\u2026" : lab);
  }
  s("text", {x: 2, y: h - 4}, svg, "rows: " + g.rowAxis + ", columns: " + g.colAxis);
  var legend = el("div", {"class": "jp-legend"}, box), lo = g.seq ? g.centre : g.centre - scale;
  el("span", {}, legend, fmt(lo) + " ");
  var stops = g.seq ? [colour(0, 0, 1, true), colour(1, 0, 1, true)]
                    : [colour(lo, g.centre, scale), colour(g.centre, g.centre, scale), colour(g.centre + scale, g.centre, scale)];
  el("span", {"class": "jp-bar", style: "background:linear-gradient(to right," + stops.join(",") + ")"}, legend);
  el("span", {}, legend, " " + fmt(g.centre + scale) + (g.seq ? "" : "   (white: " + fmt(g.centre) + ")") + (g.unit ? "   " + g.unit : ""));
  svg.addEventListener("mousemove", function (ev) {
    var t = ev.target; if (!t.classList || !t.classList.contains("jp-cell")) { tip.hide(); return; }
    var r = +t.getAttribute("data-r"), c = +t.getAttribute("data-c");
    var cl = axisLabel(g.labels, g.colAxis, c), more = g.hover || {};
    var lines = [g.title || "", g.rowAxis + " " + axisLabel(g.labels, g.rowAxis, r) + ", " + g.colAxis + " " + c +
                 (cl !== String(c) && cl !== "pos " + c ? " " + JSON.stringify(cl) : ""),
                 (more[g.rowAxis] || [])[r] || "", (more[g.colAxis] || [])[c] || "",
                 {text: "value", value: t.getAttribute("data-v")}].filter(function (l) { return l !== ""; });
    tip.show(ev, lines.concat(extra ? extra(r * g.cols + c) : []));
  });
  svg.addEventListener("mouseleave", tip.hide);
}
function heatmap(box, p, tip) {
  var shape = p.values.shape, nd = shape.length, values = decode(p.values);
  var rows = shape[nd - 2], cols = shape[nd - 1], lead = shape.slice(0, nd - 2), index = lead.map(function () { return 0; });
  var spread = p.spread && decode(p.spread), count = p.count && decode(p.count);
  var prompts = p.prompts, pvals = prompts && decode(prompts.values), chosen = 0;
  var controls = el("div", {"class": "jp-controls"}, box), row = el("div", {"class": "jp-row"}, box);
  var main = el("div", {"class": "jp-grid jp-mean"}, row), side = prompts && el("div", {"class": "jp-grid jp-prompt"}, row);
  var tokens = side && el("div", {"class": "jp-tokens"}, side.parentNode.parentNode);
  var g = {rows: rows, cols: cols, rowAxis: p.axes[nd - 2], colAxis: p.axes[nd - 1], labels: p.labels, centre: p.centre,
           unit: p.unit, narrow: !!prompts, hover: p.hover};
  function offset() { var o = 0; for (var i = 0; i < lead.length; i++) o = o * lead[i] + index[i]; return o * rows * cols; }
  function draw() {
    var o = offset();
    drawGrid(main, Object.assign({}, g, {title: p.grid_title || ""}), values, o, function (k) {
      var out = [];
      if (spread) out.push("spread over prompts (std) " + fmt(spread[o + k]));
      if (count) out.push("prompts " + count[o + k]);
      return out;
    }, tip);
    if (!prompts) return;
    var labels = Object.assign({}, p.labels);
    if (prompts.tokens) p.axes.forEach(function (a) { if (a === "pos" || a === "src") labels[a] = prompts.tokens[chosen]; });
    drawGrid(side, Object.assign({}, g, {labels: labels, hover: {}, title: prompts.labels[chosen]}), pvals,
             chosen * size(shape) + o, null, tip);
    tokens.innerHTML = "";
    if (prompts.tokens) { el("b", {}, tokens, "tokens: "); prompts.tokens[chosen].forEach(function (t, i) { el("span", {title: "pos " + i}, tokens, t); }); }
  }
  lead.forEach(function (n, i) {
    var lab = el("label", {}, controls, p.axes[i] + " "), sel = el("select", {"class": "jp-axis", "data-axis": p.axes[i]}, lab);
    for (var j = 0; j < n; j++) el("option", {value: j}, sel, axisLabel(p.labels, p.axes[i], j));
    sel.addEventListener("change", function () { index[i] = +sel.value; draw(); });
  });
  if (prompts) {
    var lab = el("label", {}, controls, "prompt "), sel = el("select", {"class": "jp-prompt"}, lab);
    prompts.labels.forEach(function (t, j) { el("option", {value: j}, sel, t); });
    sel.addEventListener("change", function () { chosen = +sel.value; draw(); });
  }
  draw();
}
function attention(box, p, tip) {
  var pat = decode(p.patterns), sh = p.patterns.shape, T = sh[3], at = {prompt: 0, layer: 0, head: 0};
  var controls = el("div", {"class": "jp-controls"}, box), grid = el("div", {"class": "jp-grid"}, box);
  [["prompt", p.labels], ["layer", null, sh[1]], ["head", null, sh[2]]].forEach(function (d) {
    var lab = el("label", {}, controls, d[0] + " "), sel = el("select", {"class": "jp-att-" + d[0]}, lab);
    (d[1] || Array.from({length: d[2]}, function (_, i) { return String(i); })).forEach(function (t, j) { el("option", {value: j}, sel, t); });
    sel.addEventListener("change", function () { at[d[0]] = +sel.value; draw(); });
  });
  function draw() {
    var toks = p.tokens[at.prompt], n = toks.length, vals = new Float32Array(n * n);
    var base = (((at.prompt * sh[1] + at.layer) * sh[2] + at.head) * T) * T;
    for (var i = 0; i < n; i++) for (var j = 0; j < n; j++) vals[i * n + j] = j > i ? NaN : pat[base + i * T + j] / 255;
    drawGrid(grid, {rows: n, cols: n, rowAxis: "dest", colAxis: "src", labels: {dest: toks, src: toks}, centre: 0,
                    unit: "attention probability (8-bit)", seq: true, title: "layer " + at.layer + ", head " + at.head},
             vals, 0, null, tip);
  }
  draw();
}
function scatter(box, p, tip) {
  var x = decode(p.x), y = decode(p.y), lo = Infinity, hi = -Infinity, W = 360, M = 46;
  for (var i = 0; i < x.length; i++) if (isFinite(x[i]) && isFinite(y[i])) { lo = Math.min(lo, x[i], y[i]); hi = Math.max(hi, x[i], y[i]); }
  if (!(hi > lo)) { hi = lo + 1; lo -= 1; }
  var pad = (hi - lo) * 0.05; lo -= pad; hi += pad;
  var sc = function (v) { return (v - lo) / (hi - lo) * W; };
  var svg = s("svg", {width: W + M + 10, height: W + M + 10, "class": "jp-scatter"}, box);
  s("rect", {x: M, y: 4, width: W, height: W, fill: "none", stroke: "#999"}, svg);
  s("line", {x1: M, y1: 4 + W, x2: M + W, y2: 4, stroke: "#aaa", "stroke-dasharray": "4 3"}, svg);
  s("text", {x: M + W / 2, y: W + 38, "text-anchor": "middle"}, svg, p.xlabel + "  [" + fmt(lo) + ", " + fmt(hi) + "]");
  s("text", {x: 12, y: 4 + W / 2, transform: "rotate(-90 12 " + (4 + W / 2) + ")", "text-anchor": "middle"}, svg, p.ylabel + "  [" + fmt(lo) + ", " + fmt(hi) + "]");
  for (i = 0; i < x.length; i++) if (isFinite(x[i]) && isFinite(y[i]))
    s("circle", {cx: M + sc(x[i]), cy: 4 + W - sc(y[i]), r: 3.5, fill: "rgba(31,119,180,.65)", "class": "jp-pt", "data-i": i}, svg);
  svg.addEventListener("mousemove", function (ev) {
    var t = ev.target; if (!t.classList || !t.classList.contains("jp-pt")) { tip.hide(); return; }
    var k = +t.getAttribute("data-i"), rest = k, where = [];
    for (var d = p.shape.length - 1; d >= 0; d--) { where.unshift(p.axes[d] + " " + (rest % p.shape[d])); rest = Math.floor(rest / p.shape[d]); }
    tip.show(ev, [where.join(", "), {text: p.xlabel, value: fmt(x[k])}, {text: p.ylabel, value: fmt(y[k])}]);
  });
  svg.addEventListener("mouseleave", tip.hide);
}
function circuit(box, p, tip) {
  var X = 56, Y = 44, L = 80, colours = {q: "#1f77b4", k: "#2ca02c", v: "#ff7f0e"};
  var w = L + X * (p.width + 1), h = Y * (p.height + 1) + 20, pos = {};
  var svg = s("svg", {width: w, height: h, "class": "jp-circuit"}, box);
  p.nodes.forEach(function (n) { pos[n.name] = [L + X * (n.x + 0.5), h - 20 - Y * (n.y + 0.5)]; });
  p.rows.forEach(function (r) { s("text", {x: 4, y: h - 20 - Y * (r[0] + 0.5) + 4}, svg, r[1]); });
  var top = 0; p.edges.forEach(function (e) { if (isFinite(e.score)) top = Math.max(top, Math.abs(e.score)); });
  p.edges.forEach(function (e, i) {
    var a = pos[e.writer], b = pos[e.node], mx = (a[0] + b[0]) / 2 + (b[1] - a[1]) * 0.15, my = (a[1] + b[1]) / 2;
    s("path", {d: "M" + a[0] + "," + a[1] + " Q" + mx + "," + my + " " + b[0] + "," + b[1], fill: "none", "class": "jp-edge",
               stroke: colours[e.chan] || "#777", "stroke-opacity": 0.6, "data-i": i,
               "stroke-width": 1 + 5 * (top > 0 && isFinite(e.score) ? Math.abs(e.score) / top : 0)}, svg);
  });
  p.nodes.forEach(function (n) {
    var q = pos[n.name];
    s("circle", {cx: q[0], cy: q[1], r: 13, fill: n.mlp ? "#f4a3a3" : "#fff", stroke: n.used ? "#000" : "#ccc"}, svg);
    s("text", {x: q[0], y: q[1] + 4, "text-anchor": "middle", style: n.used ? "" : "fill:#aaa"}, svg, n.label);
  });
  svg.addEventListener("mousemove", function (ev) {
    var t = ev.target; if (!t.classList || !t.classList.contains("jp-edge")) { tip.hide(); return; }
    var e = p.edges[+t.getAttribute("data-i")];
    tip.show(ev, [e.writer + " \u2192 " + e.reader, {text: p.score_name, value: fmt(e.score)}]);
  });
  svg.addEventListener("mouseleave", tip.hide);
}
function table(box, p) {
  var t = el("table", {}, box);
  p.rows.forEach(function (r) { var tr = el("tr", {}, t); r.forEach(function (c, i) { el(i ? "td" : "th", {}, tr, String(c)); }); });
}
var KINDS = {heatmap: heatmap, attention: attention, scatter: scatter, circuit: circuit, table: table};
function render(root) {
  if (root.getAttribute("data-done")) return;
  root.setAttribute("data-done", "1");
  var data = JSON.parse(root.querySelector("script.jp-data").textContent), tip = tipper(root);
  data.panels.forEach(function (p) {
    var box = el("section", {"class": "jp-panel jp-" + p.kind, "data-name": p.name || ""}, root);
    if (p.title) el("h3", {}, box, p.title);
    if (p.note) el("div", {"class": "jp-note"}, box, p.note);
    KINDS[p.kind](box, p, tip);
  });
}
window.jpatchView = {renderAll: function () { document.querySelectorAll(".jp-root").forEach(render); }};
window.jpatchView.renderAll();
})();
"""
