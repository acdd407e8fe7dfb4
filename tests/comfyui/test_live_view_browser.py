"""Gated: the live view in ComfyUI's own frontend, in headless Chromium, on the tiny example workflow.

One run is watched as a person would: the step counter and the loss chart of the first loop move while it trains;
the page is reloaded mid-run and every finished loop's view comes back within a second (only the progress route can
bring them: those loops send nothing any more); a second tab sees the run and is closed without stopping it; a
third tab opens the dev2pro workflow, whose loops have the same node ids, and its views stay blank while the run
trains and after; at the end the sample and grid previews are on their nodes. Then the unchanged graph is queued
again: ComfyUI serves every loop from its cache, and each view shows its last state, cached, also after a reload.
The run is the shipped tiny workflow, shrunk (two long loops, two short ones, tiny samples) to about a minute. It
leaves docs/screenshot.png for the README.

Needs Chromium and chromedriver (`bash scripts/comfyui_test_env.sh /path/to/ComfyUI` installs them); selenium is
one of the test requirements.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from trainer_core.comfy_install import install_tiny

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no chromium or chromedriver on the PATH: bash scripts/comfyui_test_env.sh /path/to/ComfyUI installs "
                "them (apt-get install chromium chromium-driver)", allow_module_level=True)

# without the background-networking flags Chromium's own connections are refused by a closed network
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,960")
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "example_workflows" / "flux_tiny_demo.json"
OTHER_WORKFLOW = ROOT / "example_workflows" / "flux_dev2pro_lora_4x750.json"  # its loops have the same node ids
SCREENSHOT = ROOT / "docs" / "screenshot.png"
SCREENSHOT_MAX_BYTES = 300_000
ROUTE = "/flux_lora_trainer/progress"

LONG_LOOP, SHORT_LOOP = 30, 2
SLOW_STEP_S = 12  # seconds a step may take on a crowded 2-core machine (0.2 on an idle one): the waits' unit
# the last loop must outlast the reload and the second tab (0.05-0.1 s a step on an idle machine), its history
# within progress.MAX_POINTS (else thinned)
LOOPS = {3: LONG_LOOP, 8: SHORT_LOOP, 13: SHORT_LOOP, 18: 150}  # TrainLoop node id -> steps
FIRST, LAST = 3, 18
FIRST_SAVE = 4  # the SaveCheckpoint under the first loop
GRID, LAST_SAMPLE = 23, 20  # the XY grid and the sample after the last loop
SMALL_SAMPLES = dict(steps=2, width=64, height=64)
CHANGES = {  # node type -> widget values, set through the frontend's widgets as a user would
    "FluxLoRA_InitTrainer": dict(resolutions="64", total_steps=sum(LOOPS.values())),
    "FluxLoRA_ValidationSample": SMALL_SAMPLES,
    "FluxLoRA_XYLoraStrengthGrid": dict(SMALL_SAMPLES, strengths="0,0.5,1"),
}

APP = "window.app"  # the frontend sets it once its setup is over: node types registered, extensions' setup run
READY_JS = f"return !!({APP}?.graph && {APP}.extensions.some(e => e.name === 'FluxLoraTrainer.LiveProgress'))"


def view(node: int | str) -> str:
    """JS for the live view widget of TrainLoop `node` (undefined until the node and its view exist)."""
    return f"{APP}.graph.getNodeById({node})?.widgets?.find(w => w.name === 'live_progress')"


RESTORED_JS = f"return !!{view(FIRST)}"
GRAPH_ID_JS = f"return ({APP}.rootGraph ?? {APP}.graph).id"
VIEW_JS = f"const view = {view('arguments[0]')}; return view ? view.element.textContent : null"
# pixels of the chart's smoothed-loss colour (rgb 110,168,254) in the node's canvas: the curve is drawn
CHART_PIXELS_JS = f"""const canvas = {view('arguments[0]')}.element.querySelector('canvas');
    if (!canvas.width || !canvas.height) return 0;
    const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 0; i < px.length; i += 4) if (px[i] < 150 && px[i + 2] > 200 && px[i + 3] > 200) n++;
    return n"""
LOAD_JS = f"""const [workflow, changes, loops, done] = arguments;
    const app = {APP};
    app.loadGraphData(workflow).then(() => {{
      for (const node of app.graph.nodes) {{
        const values = {{...changes[node.type], ...(loops[node.id] ? {{steps: loops[node.id]}} : {{}})}};
        for (const [name, value] of Object.entries(values)) {{
          const widget = node.widgets?.find(w => w.name === name);
          if (!widget) throw new Error(`${{node.type}} has no widget ${{name}}`);
          widget.value = value;
        }}
      }}
      // the shipped layout predates the live view: move what sits under the loops down to make room for it
      const [loop, top] = [app.graph.getNodeById({FIRST}), app.graph.getNodeById({FIRST_SAVE}).pos[1]];
      const room = loop.pos[1] + loop.size[1] + 40 - top;
      for (const node of app.graph.nodes) if (node.pos[1] >= top) node.pos[1] += room;
      app.graph.setDirtyCanvas(true, true);
      // record the edits as a user's would be, so the reloaded page restores this graph
      app.extensionManager.workflow.activeWorkflow.changeTracker.checkState();
    }}).then(() => done('loaded'), e => done('error: ' + e.stack));"""
QUEUE_JS = f"""const done = arguments[arguments.length - 1];
    const api = window.comfyAPI.api.api;
    {APP}.graphToPrompt().then(p => api.queuePrompt(0, p)).then(r => done(r.prompt_id), e => done('error: ' + e));"""
# puts the nodes at the canvas' top left at `scale`; returns their box on the page (left, top, right, bottom)
FRAME_JS = f"""const [ids, scale] = arguments;
    const app = {APP};
    const nodes = ids.map(id => app.graph.getNodeById(id));
    const x = Math.min(...nodes.map(n => n.pos[0])), y = Math.min(...nodes.map(n => n.pos[1])) - 40;
    const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
    const bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
    const margin = 30;
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [-x + margin / scale, -y + margin / scale];
    app.canvas.setDirty(true, true);
    const page = app.canvas.canvas.getBoundingClientRect();
    return [page.left, page.top, page.left + (right - x) * scale + 2 * margin, page.top + (bottom - y) * scale + 2 * margin];"""
COUNT_EVENTS_JS = """window.fluxEvents = 0;
    window.comfyAPI.api.api.addEventListener('flux_lora_trainer.progress', () => window.fluxEvents++);"""
PREVIEWS_JS = f"""return (({APP}.graph.getNodeById(arguments[0]).imgs) || [])
    .filter(img => img.complete && img.naturalWidth > 0).map(img => [img.naturalWidth, img.naturalHeight])"""


@dataclass
class Seen:
    """What the browser showed during the run (filled by the `watched` fixture, judged by the tests)."""

    steps_while_training: list[int] = field(default_factory=list)  # the first loop's counter at each poll
    text_while_training: str = ""
    chart_pixels_while_training: int = 0
    after_reload: str = ""  # the first loop's view right after the reload
    reload_seconds: float = 0.0  # from the restored graph to every finished loop's view back
    finished_at_reload: dict[int, str] = field(default_factory=dict)  # loops the route had done -> their views
    chart_pixels_after_reload: int = 0
    route_fetched_after_reload: bool = False
    running_at_reload: bool = False
    second_tab_view: str = ""
    second_tab_events: int = 0
    first_tab_after_second: str = ""
    other_workflow_while_training: dict[int, str] = field(default_factory=dict)  # its loops' views, seen last
    other_workflow_after: dict[int, str] = field(default_factory=dict)
    other_workflow_id: str = ""
    graph_id: str = ""
    final_views: dict[int, str] = field(default_factory=dict)
    previews: dict[int, list] = field(default_factory=dict)
    route_after: list = field(default_factory=list)
    history: dict = field(default_factory=dict)
    cached_history: dict = field(default_factory=dict)  # the unchanged graph queued again
    cached_views: dict[int, str] = field(default_factory=dict)
    cached_chart_pixels: dict[int, int] = field(default_factory=dict)
    cached_views_after_reload: dict[int, str] = field(default_factory=dict)


def step_of(text: str | None) -> int | None:
    match = re.search(r"step (\d+) / (\d+)", text or "")
    return int(match.group(1)) if match else None


def poll(probe: Callable, timeout: float, what: str, client, every: float = 0.25):
    """`probe()` once it is truthy, polling `every` seconds; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(every)
    raise TimeoutError(f"the browser never showed {what} within {timeout} s; server log:\n{client.log_tail()}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the page's network requests
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_ready(driver, client, restored: bool = True) -> None:
    """Until the page has loaded the pack's extension and (`restored`) brought the workflow back."""
    poll(lambda: driver.execute_script(READY_JS), 90, "the frontend with the pack's extension", client)
    if restored:
        poll(lambda: driver.execute_script(RESTORED_JS), 30, "the workflow restored with its TrainLoop views", client)


def still_running(client, prompt_id: str) -> bool:
    return prompt_id not in client.get(f"/history/{prompt_id}")


@pytest.fixture(scope="module")
def watched(comfyui, browser) -> Seen:
    """Run the shrunk tiny workflow from the frontend and record what the page showed along the way."""
    client, driver, seen = comfyui, browser, Seen()
    install_tiny(client.base_dir)
    # no first-visit template browser over the graph, no minimap or canvas statistics in the screenshot
    settings = json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                           "Comfy.Graph.CanvasInfo": False}).encode()
    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        urllib.request.Request(client.url + "/settings", data=settings, method="POST"), timeout=30)
    driver.get(client.url)
    wait_ready(driver, client, restored=False)
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    loaded = driver.execute_async_script(LOAD_JS, workflow, CHANGES, {str(k): v for k, v in LOOPS.items()})
    assert loaded == "loaded", loaded
    driver.execute_script(FRAME_JS, [FIRST], 1.0)
    prompt_id = driver.execute_async_script(QUEUE_JS)
    assert not prompt_id.startswith("error"), prompt_id

    # 1. the first loop trains: its counter moves and its chart is drawn
    def first_loop_done() -> bool:
        step = step_of(driver.execute_script(VIEW_JS, FIRST))
        if step is not None and step < LONG_LOOP:
            seen.steps_while_training.append(step)
            seen.text_while_training = driver.execute_script(VIEW_JS, FIRST)
            seen.chart_pixels_while_training = max(seen.chart_pixels_while_training,
                                                   driver.execute_script(CHART_PIXELS_JS, FIRST))
        return step == LONG_LOOP

    poll(first_loop_done, LONG_LOOP * SLOW_STEP_S, f"the first loop at step {LONG_LOOP}", client)

    # 2. reload mid-run: the finished loops send nothing more, so their views can only come from the route
    seen.graph_id = driver.execute_script(GRAPH_ID_JS)
    seen.running_at_reload = still_running(client, prompt_id)
    driver.get_log("performance")  # drop the requests made before the reload
    driver.refresh()
    wait_ready(driver, client)
    restored = time.monotonic()
    done_then = [int(m["node"]) for m in route(client, seen.graph_id)["loops"] if m["step"] == m["total"]]

    def finished_loops_shown() -> dict[int, str] | None:
        views = {n: driver.execute_script(VIEW_JS, n) for n in done_then}
        return views if all(step_of(v) == LOOPS[n] for n, v in views.items()) else None

    seen.finished_at_reload = poll(finished_loops_shown, 30, "the finished loops' views after the reload", client,
                                   every=0.05)
    seen.reload_seconds = time.monotonic() - restored
    driver.execute_script(FRAME_JS, [FIRST], 1.0)
    seen.after_reload = driver.execute_script(VIEW_JS, FIRST)
    seen.chart_pixels_after_reload = poll(lambda: driver.execute_script(CHART_PIXELS_JS, FIRST), 10,
                                          "the first loop's chart after the reload", client)
    seen.route_fetched_after_reload = any(ROUTE in json.loads(entry["message"])["message"].get("params", {}).get(
        "request", {}).get("url", "") for entry in driver.get_log("performance"))

    # 3. a second tab sees the last loop train; closing it stops nothing
    first_tab = driver.current_window_handle
    driver.switch_to.new_window("tab")
    driver.get(client.url)
    wait_ready(driver, client)
    driver.execute_script(COUNT_EVENTS_JS)
    driver.execute_script(FRAME_JS, [LAST], 1.0)
    seen.second_tab_view = poll(lambda: driver.execute_script(VIEW_JS, LAST) if step_of(
        driver.execute_script(VIEW_JS, LAST)) else None, 10 * SLOW_STEP_S, "the last loop's view in a second tab",
        client)
    time.sleep(2)  # a few live messages
    seen.second_tab_events = driver.execute_script("return window.fluxEvents")
    driver.close()
    driver.switch_to.window(first_tab)
    seen.first_tab_after_second = driver.execute_script(VIEW_JS, LAST) or ""

    # 3b. a third tab opens another workflow with the same node ids: none of its loops shows this run
    driver.switch_to.new_window("tab")
    other_tab = driver.current_window_handle
    driver.get(client.url)
    wait_ready(driver, client)
    other = json.loads(OTHER_WORKFLOW.read_text(encoding="utf-8"))
    loaded = driver.execute_async_script(LOAD_JS, other, {}, {})
    assert loaded == "loaded", loaded
    seen.other_workflow_id = driver.execute_script(GRAPH_ID_JS)
    for _ in range(8):  # while the last loop trains
        seen.other_workflow_while_training = {n: driver.execute_script(VIEW_JS, n) or "" for n in LOOPS}
        time.sleep(0.25)
    driver.switch_to.window(first_tab)

    # 4. the end: final views, previews, what the route tells
    seen.history = client.wait(prompt_id, timeout=sum(LOOPS.values()) * SLOW_STEP_S)
    for node_id in LOOPS:
        seen.final_views[node_id] = driver.execute_script(VIEW_JS, node_id) or ""
    box = driver.execute_script(FRAME_JS, [LAST, LAST_SAMPLE, GRID], 0.8)
    for node_id in (LAST_SAMPLE, GRID):
        seen.previews[node_id] = poll(lambda: driver.execute_script(PREVIEWS_JS, node_id), 30,
                                      f"the preview on node {node_id}", client)
    seen.route_after = route(client, seen.graph_id)["loops"]
    time.sleep(1)  # the canvas redraws the previews
    save_screenshot(driver.get_screenshot_as_png(), box)
    driver.switch_to.window(other_tab)
    seen.other_workflow_after = {n: driver.execute_script(VIEW_JS, n) or "" for n in LOOPS}
    driver.close()
    driver.switch_to.window(first_tab)

    # 5. the unchanged graph again: ComfyUI serves every loop from its cache, and no loop sends anything
    again = driver.execute_async_script(QUEUE_JS)
    assert not again.startswith("error"), again
    seen.cached_history = client.wait(again, timeout=120)

    def cached_views() -> dict[int, str] | None:
        views = {n: driver.execute_script(VIEW_JS, n) or "" for n in LOOPS}
        return views if all("cached" in v for v in views.values()) else None

    seen.cached_views = poll(cached_views, 10, "every loop's view marked cached", client)
    seen.cached_chart_pixels = {n: driver.execute_script(CHART_PIXELS_JS, n) for n in LOOPS}
    driver.refresh()
    wait_ready(driver, client)
    seen.cached_views_after_reload = poll(cached_views, 10, "every loop's view marked cached after a reload", client)
    return seen


def route(client, workflow: str) -> dict:
    """What the progress route tells a view of `workflow`."""
    return client.get(f"{ROUTE}?{urllib.parse.urlencode({'workflow': workflow})}")


def save_screenshot(png: bytes, box: list[float]) -> None:
    """The `box` part of the page (CSS pixels; headless draws one pixel each), as a palette PNG small enough to commit."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    left, top, right, bottom = (round(v) for v in box)
    image = image.crop((left, top, min(right, image.width), min(bottom, image.height)))
    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    image.save(SCREENSHOT, optimize=True)
    assert SCREENSHOT.stat().st_size <= SCREENSHOT_MAX_BYTES


def test_the_step_counter_advances_and_the_chart_is_drawn_while_training(watched):
    steps = watched.steps_while_training
    assert len(set(steps)) >= 3, f"the counter was seen at {steps}"
    assert steps == sorted(steps)
    assert re.search(r"[\d.]+ s/it · ETA \d+:\d\d", watched.text_while_training), watched.text_while_training
    assert re.search(r"loss [\d.]+ · smoothed [\d.]+", watched.text_while_training), watched.text_while_training
    assert watched.chart_pixels_while_training > 50


def test_a_reload_mid_run_restores_every_finished_loops_view_within_a_second(watched):
    assert watched.running_at_reload
    assert watched.route_fetched_after_reload
    assert FIRST in watched.finished_at_reload and all("done" in v for v in watched.finished_at_reload.values())
    assert watched.reload_seconds <= 1.0, f"{watched.reload_seconds:.2f} s"
    assert step_of(watched.after_reload) == LONG_LOOP and "done" in watched.after_reload
    assert re.search(r"smoothed \d", watched.after_reload)
    assert watched.chart_pixels_after_reload > 50


def test_a_second_tab_sees_the_run_and_closing_it_stops_nothing(watched):
    assert step_of(watched.second_tab_view) is not None and watched.second_tab_events > 0
    assert step_of(watched.first_tab_after_second) is not None  # the first tab kept receiving too
    assert watched.history["status"]["status_str"] == "success"
    assert step_of(watched.final_views[LAST]) == LOOPS[LAST] and "done" in watched.final_views[LAST]


def test_every_loop_ends_done_and_the_route_gives_numbers_only(watched):
    for node_id, steps in LOOPS.items():
        assert f"step {steps} / {steps}" in watched.final_views[node_id]
    by_node = {m["node"]: m for m in watched.route_after}
    assert set(by_node) == {str(n) for n in LOOPS}
    for node_id, message in by_node.items():
        assert message["step"] == message["total"] == LOOPS[int(node_id)] and message["running"] is False
        assert len(message["history"]) == LOOPS[int(node_id)]
        assert message["workflow"] == watched.graph_id
        ids = ("node", "prompt_id", "workflow", "history", "validation")
        scores = message.get("validation") or {}  # the loop's validation loss and the run's best point so far
        best = scores.get("best") or {}
        assert best.get("kind") in (None, "raw", "ema")
        leaves = [v for k, v in message.items() if k not in ids] + sum(message["history"], [])
        leaves += [v for k, v in scores.items() if k != "best"] + [v for k, v in best.items() if k != "kind"]
        assert all(isinstance(v, (int, float, bool)) or v is None for v in leaves)  # no paths, no names


def test_another_workflow_with_the_same_node_ids_stays_blank_while_this_one_trains_and_after(watched):
    assert watched.other_workflow_id and watched.other_workflow_id != watched.graph_id
    for views in (watched.other_workflow_while_training, watched.other_workflow_after):
        assert set(views) == set(LOOPS)
        assert all(v.startswith("waiting for the first step") for v in views.values()), views


def test_loops_served_from_comfyuis_cache_show_their_last_state_cached_also_after_a_reload(watched):
    status = watched.cached_history["status"]
    (cached,) = [m["nodes"] for kind, m in status["messages"] if kind == "execution_cached"]
    assert status["status_str"] == "success" and {str(n) for n in LOOPS} <= set(cached)
    for views in (watched.cached_views, watched.cached_views_after_reload):
        for node_id, steps in LOOPS.items():
            assert views[node_id].startswith(f"step {steps} / {steps}") and "done · cached" in views[node_id]
    assert all(pixels > 50 for pixels in watched.cached_chart_pixels.values()), watched.cached_chart_pixels


def test_the_sample_and_the_grid_show_as_previews_on_their_nodes(watched):
    assert len(watched.previews[LAST_SAMPLE]) == 2  # one image per prompt line
    ((width, height),) = watched.previews[GRID]
    assert width > 3 * 64 and height > 4 * 64  # 3 strengths x 4 checkpoints, labelled


def test_the_view_stays_out_of_the_prompt(watched):
    prompt = watched.history["prompt"][2]
    for node_id in LOOPS:
        assert set(prompt[str(node_id)]["inputs"]) == {"handle", "steps"}
