"""Views of a traced attention graph: a static PNG (matplotlib) and a standalone HTML page.

Layout (both views): one row per level (input at the bottom, the last layer/step on top), one
column per token; Transformer-XL memory nodes sit to the left of the tokens (squares), halted
UT positions are hollow grey circles. Edge width and opacity follow the attention weight.
Comparison colours follow Attention Flows: model A turquoise, model B purple, shared edges
dark grey.
"""

from __future__ import annotations

import json
from pathlib import Path

from xvariants.interpret.compare import Comparison
from xvariants.interpret.flow import TraceGraph
from xvariants.interpret.record import AttentionRecord

COLOR_A = "#1fb5ad"  # turquoise
COLOR_B = "#8e44ad"  # purple
COLOR_SHARED = "#555555"
COLOR_MEMORY = "#e67e22"


def _layout(recs: list[AttentionRecord]):
    max_mem = max(r.n_memory(l) for r in recs for l in range(1, r.n_layers + 1))
    gap = 1 if max_mem else 0

    def xy(level: int, pos: int) -> tuple[float, float]:
        return (pos + (max_mem + gap if pos >= 0 else max_mem + 0), float(level))

    return xy, max_mem, gap


def plot_trace(view: TraceGraph | Comparison, path: str | Path | None = None, title: str | None = None):
    """Draw a :class:`TraceGraph` or a :class:`Comparison` as a layered graph; save it to
    ``path`` (PNG) when given. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    if isinstance(view, Comparison):
        rec = view.a.record
        graphs = [(view.a, COLOR_A), (view.b, COLOR_B)]
        shared = view.shared
    else:
        rec = view.record
        graphs = [(view, COLOR_A)]
        shared = set()
    recs = [g.record for g, _ in graphs]
    xy, max_mem, gap = _layout(recs)
    T, L = rec.n_tokens, max(r.n_layers for r in recs)

    def copies(lvl: int, pos: int) -> bool:
        return any(r.copies(lvl, pos) for r in recs)

    width = max(6.0, 0.55 * (T + max_mem + gap) + 2)
    height = max(3.5, 0.75 * (L + 1) + 2)
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    # faint grid of every node
    for lvl in range(L + 1):
        xs = [xy(lvl, p)[0] for p in range(T)]
        ax.scatter(xs, [lvl] * T, s=18, color="#dddddd", zorder=1)
    for layer in range(1, L + 1):
        M = max(r.n_memory(layer) for r in recs if layer <= r.n_layers)
        if M:
            ax.scatter([xy(layer - 1, -j)[0] for j in range(1, M + 1)], [layer - 1] * M, s=22, marker="s",
                       color="#f6d5b5", zorder=1)
    drawn_nodes: set[tuple[int, int]] = set()
    for g, color in graphs:
        segs, widths, colors = [], [], []
        for e in g.edges:
            c = COLOR_SHARED if (isinstance(view, Comparison) and e.key in shared) else color
            (x0, y0), (x1, y1) = xy(*e.upper), xy(*e.lower)
            segs.append([(x0, y0), (x1, y1)])
            widths.append(0.6 + 3.0 * min(1.0, e.weight))
            alpha = 0.35 + 0.6 * min(1.0, e.weight)
            rgba = matplotlib.colors.to_rgba(c, alpha)
            colors.append(rgba)
        if segs:
            lc = LineCollection(segs, linewidths=widths, colors=colors, zorder=2)
            copy = [e.kind == "copy" for e in g.edges]
            lc.set_linestyles(["--" if k else "-" for k in copy])
            ax.add_collection(lc)
        drawn_nodes |= g.nodes
    for lvl, pos in drawn_nodes:
        x, y = xy(lvl, pos)
        if pos < 0:
            ax.scatter([x], [y], s=60, marker="s", color=COLOR_MEMORY, zorder=3)
        elif lvl >= 1 and copies(lvl, pos):
            ax.scatter([x], [y], s=60, facecolors="white", edgecolors="#888888", zorder=3)
        else:
            ax.scatter([x], [y], s=60, color="#2c3e50", zorder=3)
    # halted positions that are not on the trace are still marked
    for lvl in range(1, L + 1):
        for pos in range(T):
            if copies(lvl, pos) and (lvl, pos) not in drawn_nodes:
                x, y = xy(lvl, pos)
                ax.scatter([x], [y], s=22, facecolors="white", edgecolors="#bbbbbb", zorder=2)
    start_lvl = rec.n_layers if graphs[0][0].direction == "backward" else 0
    sx, sy = xy(start_lvl, graphs[0][0].start)
    ax.scatter([sx], [sy], s=160, facecolors="none", edgecolors="#c0392b", linewidths=2, zorder=4)
    labels = [t if len(t) <= 12 else t[:11] + "…" for t in rec.tokens]
    ticks = [xy(0, p)[0] for p in range(T)]
    M1 = rec.n_memory(1)
    if M1:  # memory leaves of the first layer sit on the input row: label them too
        ticks = [xy(0, -j)[0] for j in range(M1, 0, -1)] + ticks
        labels = [rec.memory_label(j, 1)[:12] for j in range(M1)] + labels
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    word = "/".join(sorted({r.layer_word for r in recs}))
    ax.set_yticks(range(L + 1))
    ax.set_yticklabels(["input"] + [f"{word} {l}" for l in range(1, L + 1)], fontsize=8)
    if max_mem:
        ax.axvline(max_mem + gap / 2 + 0.0, color="#cccccc", lw=0.8, ls=":")
        ax.text(max_mem / 2 + 0.5, L + 0.45, "memory", ha="center", fontsize=8, color=COLOR_MEMORY)
    ax.set_xlim(-0.7, max_mem + gap + T - 0.3)
    ax.set_ylim(-0.5, L + 0.7)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    g0 = graphs[0][0]
    if title is None:
        if isinstance(view, Comparison):
            title = (f"{view.a.record.name} (turquoise) vs {view.b.record.name} (purple), shared grey: "
                     f"{len(view.shared)} shared, {len(view.only_a)} / {len(view.only_b)} exclusive edges")
        else:
            title = f"{rec.name}: {g0.direction} trace from {rec.tokens[g0.start]!r}, tau={g0.tau}, {len(g0.edges)} edges"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig


# ---------------------------------------------------------------------- HTML
def _json_for_script(obj) -> str:
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def write_html(
    path: str | Path,
    records: AttentionRecord | list[AttentionRecord],
    *,
    tau: float = 0.1,
    start: int | None = None,
    direction: str = "backward",
    merge: str = "any",
    title: str | None = None,
    decimals: int = 5,
) -> Path:
    """Write a standalone interactive page (inline SVG + JS, no network): pick the token to
    trace (select, or click a node of the start level), threshold slider, direction, head
    merge mode, per-layer head selection, and for two records the comparison colours."""
    recs = [records] if isinstance(records, AttentionRecord) else list(records)
    if not 1 <= len(recs) <= 2:
        raise ValueError("the page shows one model or compares two")
    if len(recs) == 2 and recs[0].n_tokens != recs[1].n_tokens:
        raise ValueError("compared models must see the same tokens")
    if start is None:
        start = recs[0].default_start() if direction == "backward" else 0
    data = {
        "models": [r.to_dict(decimals) for r in recs],
        "init": {"tau": tau, "start": start, "direction": direction, "merge": merge},
        "colors": {"a": COLOR_A, "b": COLOR_B, "shared": COLOR_SHARED, "memory": COLOR_MEMORY},
    }
    if title is None:
        title = "Attention flow: " + " vs ".join(r.name for r in recs)
    html = _TEMPLATE.replace("__TITLE__", _escape(title)).replace("__DATA__", _json_for_script(data))
    path = Path(path)
    path.write_text(html, encoding="utf-8")
    return path


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 8px}
#controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin-bottom:8px;font-size:13px}
#legend span{display:inline-block;margin-right:14px;font-size:12px}
#legend i{display:inline-block;width:18px;height:4px;margin-right:4px;vertical-align:middle}
svg{border:1px solid #eee;background:#fff}
.node{stroke:#fff;stroke-width:1}
.node.grid{fill:#e3e3e3}
.node.on{fill:#2c3e50}
.node.mem{fill:#f6d5b5}
.node.mem.on{fill:#e67e22}
.node.halted{fill:#fff;stroke:#999;stroke-width:1.2}
.node.start{stroke:#c0392b;stroke-width:3}
.node.pick{cursor:pointer}
.tok{font-size:11px;fill:#333}
.lvl{font-size:11px;fill:#777}
.heads{display:inline-block;vertical-align:top;margin:8px 24px 0 0;font-size:11px}
.heads table{border-collapse:collapse}
.heads td{border:1px solid #eee;padding:0 2px;text-align:center}
#summary{font-size:13px;margin-top:8px}
</style></head><body>
<h1 id="title">__TITLE__</h1>
<div id="controls">
<label>token <select id="token"></select></label>
<label>direction <select id="direction"><option value="backward">backward (to the input)</option><option value="forward">forward (from an input token)</option></select></label>
<label>heads <select id="merge"><option value="any">per head (any selected head &gt; &tau;)</option><option value="mean">merged (mean of selected heads &gt; &tau;)</option></select></label>
<label>&tau; <input type="range" id="tau" min="0" max="1" step="0.005"> <span id="tauval"></span></label>
<span id="modelToggles"></span>
</div>
<div id="legend"></div>
<svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg>
<div id="summary"></div>
<div id="headgrids"></div>
<script>const DATA = __DATA__;</script>
<script>
(function(){
"use strict";
const NS = "http://www.w3.org/2000/svg";
const M = DATA.models, C = DATA.colors;
const T = M[0].tokens.length, L = Math.max.apply(null, M.map(m => m.layers.length));
const st = {tau: DATA.init.tau, start: DATA.init.start, direction: DATA.init.direction, merge: DATA.init.merge,
            show: M.map(() => true),
            heads: M.map(m => m.layers.map(l => l.attn.map(() => true)))};
const $ = id => document.getElementById(id);

function copies(m, layer, q){ const l = m.layers[layer-1]; return m.freeze_halted && l.active !== null && !l.active[q]; }
function selected(mi, layer){ const out=[]; st.heads[mi][layer-1].forEach((on,h)=>{ if(on) out.push(h); }); return out; }
function pair(mi, layer, q, k){
  // -> [kept, weight, {head: w}] for query q, key column k (memory first)
  const A = M[mi].layers[layer-1].attn, idx = selected(mi, layer), hs = {};
  if(!idx.length) return [false, 0, hs];
  let mx = -1, sum = 0, any = false;
  for(const h of idx){ const w = A[h][q][k]; sum += w; if(w > mx) mx = w; if(w > st.tau){ any = true; hs[h] = w; } }
  if(st.merge === "any") return [any, mx, hs];
  const mean = sum / idx.length; return [mean > st.tau, mean, hs];
}
function traceModel(mi){
  const m = M[mi], nL = m.layers.length, edges = [];
  let frontier = new Set([st.start]);
  if(st.direction === "backward"){
    for(let layer = nL; layer >= 1; layer--){
      const Mm = m.layers[layer-1].n_memory, S = Mm + T, nxt = new Set();
      for(const q of Array.from(frontier).sort((a,b)=>a-b)){
        if(copies(m, layer, q)){ edges.push({level:layer, src:q, dst:q, weight:1, heads:{}, kind:"copy"}); nxt.add(q); continue; }
        for(let k = 0; k < S; k++){
          const r = pair(mi, layer, q, k);
          if(r[0]){ edges.push({level:layer, src:q, dst:k-Mm, weight:r[1], heads:r[2], kind:"attn"}); if(k >= Mm) nxt.add(k-Mm); }
        }
      }
      frontier = nxt;
    }
  } else {
    for(let layer = 1; layer <= nL; layer++){
      const Mm = m.layers[layer-1].n_memory, nxt = new Set(), cols = Array.from(frontier).sort((a,b)=>a-b);
      for(let q = 0; q < T; q++){
        if(copies(m, layer, q)){ if(frontier.has(q)){ edges.push({level:layer, src:q, dst:q, weight:1, heads:{}, kind:"copy"}); nxt.add(q); } continue; }
        for(const k of cols){
          const r = pair(mi, layer, q, k + Mm);
          if(r[0]){ edges.push({level:layer, src:q, dst:k, weight:r[1], heads:r[2], kind:"attn"}); nxt.add(q); }
        }
      }
      frontier = nxt;
    }
  }
  return edges;
}
function key(e){ return e.level + ":" + e.src + ":" + e.dst + ":" + e.kind; }
function el(name, attrs, parent){ const e = document.createElementNS(NS, name); for(const a in attrs) e.setAttribute(a, attrs[a]); if(parent) parent.appendChild(e); return e; }

const maxMem = Math.max(0, ...M.flatMap(m => m.layers.map(l => l.n_memory)));
const gap = maxMem ? 1 : 0, dx = 46, dy = 70, left = 90, top = 30;
const W = left + (maxMem + gap + T) * dx + 20, H = top + L * dy + 110;
function X(pos){ return left + (pos >= 0 ? pos + maxMem + gap : pos + maxMem) * dx; }
function Y(level){ return top + (L - level) * dy; }

function render(){
  const svg = $("graph"); svg.innerHTML = ""; svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const gE = el("g", {id: "edges"}, svg), gN = el("g", {id: "nodes"}, svg), gL = el("g", {id: "labels"}, svg);
  const word = M[0].layer_word;
  for(let lvl = 0; lvl <= L; lvl++){ const t = el("text", {x: 6, y: Y(lvl) + 4, class: "lvl"}, gL); t.textContent = lvl ? word + " " + lvl : "input"; }
  const traces = M.map((m, i) => st.show[i] ? traceModel(i) : []);
  const sets = traces.map(es => new Set(es.map(key)));
  const on = new Set();
  const counts = {all: 0, shared: 0, a: 0, b: 0};
  traces.forEach((es, i) => es.forEach(e => {
    const both = M.length === 2 && st.show[0] && st.show[1] && sets[1-i].has(key(e));
    if(both && i === 1) return;  // drawn once, from model A
    const cls = both ? "edge edge-shared" : (i === 0 ? "edge edge-a" : "edge edge-b");
    const color = both ? C.shared : (i === 0 ? C.a : C.b);
    const w = Math.min(1, e.weight);
    const ln = el("line", {x1: X(e.src), y1: Y(e.level), x2: X(e.dst), y2: Y(e.level-1), class: cls + (e.kind === "copy" ? " copy" : ""),
      stroke: color, "stroke-width": (0.6 + 3.2 * w).toFixed(2), "stroke-opacity": (0.35 + 0.6 * w).toFixed(2)}, gE);
    if(e.kind === "copy") ln.setAttribute("stroke-dasharray", "4 3");
    const tt = el("title", {}, ln);
    tt.textContent = M[i].name + ": " + word + " " + e.level + ", " + label(e.src, e.level) + " \u2192 " + label(e.dst, e.level) +
      " w=" + e.weight.toFixed(3) + (Object.keys(e.heads).length ? " heads " + Object.keys(e.heads).join(",") : "") + (e.kind === "copy" ? " (halted: copy)" : "");
    on.add(e.level + ":" + e.src); on.add((e.level-1) + ":" + e.dst);
    counts[both ? "shared" : (i === 0 ? "a" : "b")]++; counts.all++;
  }));
  const startLevels = M.map(m => st.direction === "backward" ? m.layers.length : 0);
  startLevels.forEach(l => on.add(l + ":" + st.start));
  for(let lvl = 0; lvl <= L; lvl++){
    for(let p = 0; p < T; p++){
      const halted = lvl >= 1 && M.some(m => lvl <= m.layers.length && copies(m, lvl, p));
      const isOn = on.has(lvl + ":" + p);
      const pickable = startLevels.includes(lvl);
      const isStart = pickable && p === st.start;
      const c = el("circle", {cx: X(p), cy: Y(lvl), r: isOn ? 7 : 4,
        class: "node " + (halted ? "halted" : (isOn ? "on" : "grid")) + (isStart ? " start" : "") + (pickable ? " pick" : ""),
        "data-level": lvl, "data-pos": p}, gN);
      const tt = el("title", {}, c); tt.textContent = M[0].tokens[p] + " @ " + (lvl ? word + " " + lvl : "input") + (halted ? " (halted)" : "");
      if(pickable) c.addEventListener("click", () => { st.start = p; $("token").value = p; render(); });
    }
  }
  for(let layer = 1; layer <= L; layer++){
    const Mm = Math.max(0, ...M.map(m => layer <= m.layers.length ? m.layers[layer-1].n_memory : 0));
    for(let j = 1; j <= Mm; j++){
      const isOn = on.has((layer-1) + ":" + (-j));
      const r = el("rect", {x: X(-j) - 5, y: Y(layer-1) - 5, width: 10, height: 10, class: "node mem" + (isOn ? " on" : "")}, gN);
      const tt = el("title", {}, r); tt.textContent = "memory " + label(-j, layer) + " (leaf)";
      if(layer === 1){ const t = el("text", {x: X(-j), y: Y(0) + 18, class: "tok", transform: "rotate(50 " + X(-j) + " " + (Y(0) + 18) + ")"}, gL); t.textContent = label(-j, 1); }
    }
  }
  for(let p = 0; p < T; p++){
    const t = el("text", {x: X(p), y: Y(0) + 18, class: "tok", transform: "rotate(50 " + X(p) + " " + (Y(0) + 18) + ")"}, gL);
    t.textContent = M[0].tokens[p];
  }
  if(maxMem){ const t = el("text", {x: X(-1) - (maxMem - 1) * dx / 2, y: top - 12, class: "lvl", "text-anchor": "middle"}, gL); t.textContent = "memory"; }
  // summary (the test reads the data-* attributes)
  const sm = $("summary");
  sm.setAttribute("data-edges", counts.all);
  traces.forEach((es, i) => sm.setAttribute("data-edges-" + "ab"[i], es.length));
  sm.setAttribute("data-shared", counts.shared);
  let txt = counts.all + " edges drawn";
  if(M.length === 2) txt += " \u2014 shared " + counts.shared + ", only " + M[0].name + " " + counts.a + ", only " + M[1].name + " " + counts.b;
  traces.forEach((es, i) => {
    let mem = 0, tot = 0; es.forEach(e => { if(e.kind === "attn"){ tot += e.weight; if(e.dst < 0) mem += e.weight; } });
    if(M[i].layers.some(l => l.n_memory > 0)) txt += "; " + M[i].name + ": share of traced weight into memory " + (tot ? (100 * mem / tot).toFixed(1) : "0.0") + "%";
  });
  sm.textContent = txt;
  renderHeads(traces);
}
function label(pos, layer){
  if(pos >= 0) return M[0].tokens[pos];
  const mt = M[0].memory_tokens, Mm = M[0].layers[Math.max(0, layer-1)].n_memory;
  if(mt && mt.length >= Mm) return mt[mt.length + pos];
  return "mem" + pos;
}
function renderHeads(traces){
  const box = $("headgrids"); box.innerHTML = "";
  M.forEach((m, mi) => {
    const imp = m.layers.map(l => l.attn.map(() => 0));
    traces[mi].forEach(e => { for(const h in e.heads) imp[e.level-1][h] += e.heads[h]; });
    const mx = Math.max(1e-9, ...imp.flat());
    const d = document.createElement("div"); d.className = "heads";
    const hdr = document.createElement("div");
    hdr.innerHTML = "<b></b> heads (cell shade = traced weight carried; untick to drop a head) ";
    hdr.firstChild.textContent = m.name;
    const all = document.createElement("button"); all.textContent = "all"; all.onclick = () => { st.heads[mi].forEach(r => r.fill(true)); render(); };
    const none = document.createElement("button"); none.textContent = "none"; none.onclick = () => { st.heads[mi].forEach(r => r.fill(false)); render(); };
    hdr.appendChild(all); hdr.appendChild(none); d.appendChild(hdr);
    const tb = document.createElement("table");
    const head = document.createElement("tr"); head.appendChild(document.createElement("td"));
    m.layers[0].attn.forEach((_, h) => { const td = document.createElement("td"); td.textContent = h; head.appendChild(td); });
    tb.appendChild(head);
    for(let layer = m.layers.length; layer >= 1; layer--){
      const tr = document.createElement("tr"); const th = document.createElement("td"); th.textContent = m.layer_word + " " + layer; tr.appendChild(th);
      m.layers[layer-1].attn.forEach((_, h) => {
        const td = document.createElement("td"); const a = imp[layer-1][h] / mx;
        td.style.background = "rgba(" + (mi ? "142,68,173," : "31,181,173,") + a.toFixed(3) + ")";
        const cb = document.createElement("input"); cb.type = "checkbox"; cb.checked = st.heads[mi][layer-1][h];
        cb.className = "headbox"; cb.title = "layer " + layer + " head " + h + ": " + imp[layer-1][h].toFixed(3);
        cb.onchange = () => { st.heads[mi][layer-1][h] = cb.checked; render(); };
        td.appendChild(cb); tr.appendChild(td);
      });
      tb.appendChild(tr);
    }
    d.appendChild(tb); box.appendChild(d);
  });
}
function init(){
  const sel = $("token");
  M[0].tokens.forEach((t, i) => { const o = document.createElement("option"); o.value = i; o.textContent = i + ": " + t; sel.appendChild(o); });
  sel.value = st.start; sel.onchange = () => { st.start = +sel.value; render(); };
  const dir = $("direction"); dir.value = st.direction;
  dir.onchange = () => { st.direction = dir.value; st.start = dir.value === "backward" ? (M[0].causal ? T - 1 : 0) : 0; sel.value = st.start; render(); };
  const mg = $("merge"); mg.value = st.merge; mg.onchange = () => { st.merge = mg.value; render(); };
  const tau = $("tau"); tau.value = st.tau; $("tauval").textContent = st.tau;
  tau.oninput = () => { st.tau = +tau.value; $("tauval").textContent = st.tau.toFixed(3); render(); };
  const tg = $("modelToggles"), lg = $("legend");
  M.forEach((m, i) => {
    const lab = document.createElement("label"); const cb = document.createElement("input"); cb.type = "checkbox"; cb.checked = true;
    cb.onchange = () => { st.show[i] = cb.checked; render(); };
    lab.appendChild(cb); lab.appendChild(document.createTextNode(" " + m.name)); tg.appendChild(lab);
    const s = document.createElement("span"); const sw = document.createElement("i"); sw.style.background = i ? C.b : C.a;
    s.appendChild(sw); s.appendChild(document.createTextNode(M.length === 2 ? "only " + m.name : m.name)); lg.appendChild(s);
  });
  if(M.length === 2){ const s = document.createElement("span"); const sw = document.createElement("i"); sw.style.background = C.shared; s.appendChild(sw); s.appendChild(document.createTextNode("shared")); lg.appendChild(s); }
  const s2 = document.createElement("span"); s2.textContent = "dashed = halted position (state copied); squares = memory (leaves)"; lg.appendChild(s2);
  render();
}
init();
})();
</script>
</body></html>
"""
