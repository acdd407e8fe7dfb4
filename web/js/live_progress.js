// Live view of a running TrainLoop: step / total, s/it, ETA, loss (current and smoothed), a loss chart that grows
// as training runs, and after the loop its validation loss (raw and EMA LoRA) with the best point of the run so far.
// The server broadcasts "flux_lora_trainer.progress" messages (throttled, numbers only) to every open tab, each
// naming its node, prompt and the workflow (graph id) it was queued from; a graph shows only its own.
// A tab that (re)loads a graph asks /flux_lora_trainer/progress?workflow=<id> for the last state of each of its loops
// (nodes/live_view.py); a loop loaded from the run store, or served from ComfyUI's cache, says so. Nothing is loaded
// from outside ComfyUI.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "FluxLoRA_TrainLoop";
const EVENT = "flux_lora_trainer.progress";
const ROUTE = "/flux_lora_trainer/progress";
const CHART_HEIGHT = 110; // CSS pixels
const RAW_COLOR = "rgba(110, 168, 254, 0.45)";
const SMOOTH_COLOR = "rgb(110, 168, 254)";

// the runs this graph queued: TrainLoop node id -> latest message, and the ids of the prompts queued from this graph.
// Messages of other workflows are never shown: two graphs may hold the same node ids.
let latest = new Map();
let prompts = new Set();
// the TrainLoops the latest prompt of this graph took from ComfyUI's cache (it tells only the tab that queued it;
// the others learn it from the route once the prompt has run)
let cachedRun = { prompt: null, nodes: new Set() };

function formatDuration(seconds) {
  const s = Math.round(seconds);
  const [h, m] = [Math.floor(s / 3600), Math.floor((s % 3600) / 60)];
  const mmss = `${String(m).padStart(h ? 2 : 1, "0")}:${String(s % 60).padStart(2, "0")}`;
  return h ? `${h}:${mmss}` : mmss;
}

const formatLoss = (value) => (value == null ? "–" : value.toPrecision(4));

// "validation 0.0941 · EMA 0.0972 · best step 100 raw (0.0941)": the loop's end scored, and the run's best so far
function validationLine(v) {
  if (!v) return "";
  const parts = [`validation ${formatLoss(v.raw)}`];
  if (v.ema != null) parts.push(`EMA ${formatLoss(v.ema)}`);
  parts.push(`best step ${v.best.step} ${v.best.kind} (${formatLoss(v.best.loss)})`);
  return parts.join(" · ");
}

function statusLine(msg) {
  const parts = [`step ${msg.step} / ${msg.total}`];
  if (msg.s_per_it != null) parts.push(`${msg.s_per_it.toFixed(msg.s_per_it < 10 ? 2 : 1)} s/it`);
  if (msg.loaded) parts.push("loaded from the run store");
  else if (msg.running) parts.push(msg.eta_s == null ? "ETA –" : `ETA ${formatDuration(msg.eta_s)}`);
  else parts.push(msg.step < msg.total ? "stopped" : "done");
  if (msg.cached) parts.push("cached"); // this prompt took the loop from ComfyUI's cache: its state of the last run
  return parts.join(" · ");
}

class ProgressView {
  constructor(node) {
    this.message = null;
    this.element = document.createElement("div");
    this.element.className = "flux-lora-progress";
    this.element.style.cssText = "display:flex;flex-direction:column;gap:2px;font-size:11px;"
      + "color:var(--input-text, #ddd);font-variant-numeric:tabular-nums;overflow:hidden";
    this.status = document.createElement("div");
    this.loss = document.createElement("div");
    this.validation = document.createElement("div");
    this.canvas = document.createElement("canvas");
    this.canvas.style.cssText = `width:100%;height:${CHART_HEIGHT}px;border-radius:4px;`
      + "background:var(--comfy-input-bg, #222)";
    this.element.append(this.status, this.loss, this.validation, this.canvas);
    this.status.textContent = "waiting for the first step";
    this.widget = node.addDOMWidget("live_progress", "flux_lora_progress", this.element, {
      serialize: false, // a view, not an input: kept out of the prompt and the saved workflow
      getMinHeight: () => CHART_HEIGHT + 40,
    });
    this.widget.serialize = false;
    new ResizeObserver(() => this.drawChart()).observe(this.canvas);
  }

  show(msg) {
    this.message = msg;
    this.status.textContent = statusLine(msg);
    this.loss.textContent = `loss ${formatLoss(msg.loss)} · smoothed ${formatLoss(msg.smoothed_loss)}`;
    this.validation.textContent = validationLine(msg.validation);
    this.drawChart();
  }

  drawChart() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const [w, h] = [canvas.clientWidth, canvas.clientHeight];
    if (!w || !h) return; // hidden (zoomed out, collapsed): drawn again when it is resized back
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const points = this.message?.history ?? [];
    if (!points.length) return;

    const msg = this.message;
    const first = msg.run_step - msg.step; // the loop's x axis spans its whole length, so the curve grows rightward
    const last = first + msg.total;
    const values = points.flatMap(([, loss, smooth]) => [loss, smooth]);
    let [lo, hi] = [Math.min(...values), Math.max(...values)];
    if (hi - lo < 1e-12) [lo, hi] = [lo - 0.5 * Math.abs(lo || 1), hi + 0.5 * Math.abs(hi || 1)];
    const pad = { left: 44, right: 6, top: 6, bottom: 14 };
    const x = (step) => pad.left + ((step - first) / (last - first)) * (w - pad.left - pad.right);
    const y = (v) => pad.top + ((hi - v) / (hi - lo)) * (h - pad.top - pad.bottom);

    ctx.font = "10px sans-serif";
    ctx.fillStyle = "rgba(200, 200, 200, 0.8)";
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillText(hi.toPrecision(3), pad.left - 4, pad.top);
    ctx.textBaseline = "bottom";
    ctx.fillText(lo.toPrecision(3), pad.left - 4, h - pad.bottom);
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(String(first), pad.left, h - 2);
    ctx.textAlign = "right";
    ctx.fillText(String(last), w - pad.right, h - 2);

    const line = (index, color, width) => {
      ctx.strokeStyle = ctx.fillStyle = color;
      ctx.lineWidth = width;
      if (points.length === 1) {
        ctx.beginPath();
        ctx.arc(x(points[0][0]), y(points[0][index]), 2.5, 0, 2 * Math.PI);
        ctx.fill();
        return;
      }
      ctx.beginPath();
      points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[index])) : ctx.moveTo(x(p[0]), y(p[index]))));
      ctx.stroke();
    };
    line(1, RAW_COLOR, 1);
    line(2, SMOOTH_COLOR, 2);
  }
}

const graphId = () => (app.rootGraph ?? app.graph)?.id;
const viewOf = (node) => app.graph?.getNodeById(Number(node))?.fluxLoraProgress; // ids in subgraphs look like "5:3"

function show(msg) {
  if (!msg.workflow || msg.workflow !== graphId()) return; // another workflow's run, or a prompt without a workflow
  latest.set(String(msg.node), msg);
  prompts.add(msg.prompt_id);
  const cached = msg.cached || (cachedRun.nodes.has(String(msg.node)) && msg.prompt_id !== cachedRun.prompt);
  viewOf(msg.node)?.show(cached ? { ...msg, cached } : msg);
}

// what the server knows of this graph's runs: every loop's last state, within a request of a (re)load
async function catchUp() {
  const id = graphId();
  if (!id) return;
  try {
    const response = await api.fetchApi(`${ROUTE}?workflow=${encodeURIComponent(id)}`, { cache: "no-store" });
    if (!response.ok || graphId() !== id) return;
    const state = await response.json();
    if (graphId() !== id) return; // another workflow was opened meanwhile
    prompts = new Set(state.prompts);
    state.loops.forEach(show);
  } catch (error) {
    console.warn("Flux LoRA Trainer: could not fetch the training progress", error);
  }
}

// sent to the tab that queued the prompt: the nodes ComfyUI serves from its cache, which send nothing of their own
async function markCached({ detail }) {
  await catchUp(); // learns whether this graph queued the prompt
  if (!prompts.has(detail.prompt_id)) return;
  cachedRun = { prompt: detail.prompt_id, nodes: new Set(detail.nodes.map(String)) };
  for (const node of cachedRun.nodes) if (latest.has(node)) show(latest.get(node));
}

app.registerExtension({
  name: "FluxLoraTrainer.LiveProgress",

  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const fresh = !prompts.has(detail.prompt_id);
      show(detail);
      if (fresh && detail.workflow === graphId()) catchUp(); // a new run of this graph: how its other loops stand
    });
    api.addEventListener("execution_cached", markCached);
    api.addEventListener("status", catchUp); // the queue moved: a run started or ended, perhaps all from the cache
    api.addEventListener("reconnected", catchUp);
    await catchUp();
  },

  beforeConfigureGraph() {
    latest = new Map(); // another graph, or the same one restored: what it shows comes from the server
    prompts = new Set();
    cachedRun = { prompt: null, nodes: new Set() };
  },

  afterConfigureGraph() {
    catchUp();
  },

  nodeCreated(node) {
    if (node.comfyClass === NODE_TYPE) node.fluxLoraProgress = new ProgressView(node);
  },
});
