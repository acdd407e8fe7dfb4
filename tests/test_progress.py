"""The live view's numbers (`trainer_core.progress`) and how TrainLoop sends them through the bridge, without ComfyUI.

The frontend and the route are exercised in a real ComfyUI and browser by tests/comfyui/test_live_view_browser.py.
"""
import json
import math
import posixpath
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pack import load_pack  # the pack imported as ComfyUI imports it
from trainer_core.progress import LOSS_SMOOTHING, SPEED_WINDOW, ProgressTracker
from trainer_core.trainer import StepInfo

ROOT = Path(__file__).resolve().parents[1]
pack = load_pack()
bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
live = sys.modules[f"{pack.__name__}.nodes.live_view"]
TrainLoop = pack.NODE_CLASS_MAPPINGS["FluxLoRA_TrainLoop"]


def feed(tracker: ProgressTracker, losses, seconds=0.5) -> None:
    for loss in losses:
        tracker.update(StepInfo(tracker.step + 1, loss, 1e-4, seconds))


def strictly_json(snapshot: dict) -> dict:
    return json.loads(json.dumps(snapshot, allow_nan=False))  # the browser's JSON.parse rejects NaN


def test_counts_steps_of_the_loop_from_where_it_starts():
    tracker = ProgressTracker(total=10, first_step=30)  # the third loop of a run, or a continued one
    assert strictly_json(tracker.snapshot()) == {
        "step": 0, "total": 10, "run_step": 30, "running": True, "s_per_it": None, "eta_s": None, "loss": None,
        "smoothed_loss": None, "history": []}
    feed(tracker, [1.0, 0.8, 0.6], seconds=2.0)
    snap = strictly_json(tracker.snapshot())
    assert (snap["step"], snap["run_step"], snap["loss"]) == (3, 33, 0.6)
    assert snap["s_per_it"] == pytest.approx(2.0) and snap["eta_s"] == pytest.approx(7 * 2.0)
    assert [p[0] for p in snap["history"]] == [31, 32, 33]


def test_speed_is_a_moving_mean_of_the_recent_steps():
    tracker = ProgressTracker(total=1000)
    feed(tracker, [1.0] * SPEED_WINDOW, seconds=5.0)  # a slow start (compiling, caching)...
    feed(tracker, [1.0] * SPEED_WINDOW, seconds=1.0)  # ...is forgotten once the window has passed
    assert tracker.seconds_per_step == pytest.approx(1.0)
    feed(tracker, [1.0] * (SPEED_WINDOW // 2), seconds=3.0)
    assert tracker.seconds_per_step == pytest.approx(2.0)  # half the window at 1 s, half at 3 s
    assert tracker.eta_seconds == pytest.approx(2.0 * (1000 - tracker.done))


def test_smoothed_loss_starts_at_the_loss_and_lags_behind_a_jump():
    tracker = ProgressTracker(total=100)
    feed(tracker, [2.0])
    assert tracker.smoothed_loss == pytest.approx(2.0)  # bias-corrected: not pulled toward 0 at first
    feed(tracker, [2.0] * 9)
    assert tracker.smoothed_loss == pytest.approx(2.0)
    feed(tracker, [1.0])
    expected = (LOSS_SMOOTHING * 2.0 * (1 - LOSS_SMOOTHING**10) + (1 - LOSS_SMOOTHING) * 1.0) / (1 - LOSS_SMOOTHING**11)
    assert tracker.smoothed_loss == pytest.approx(expected)
    assert 1.0 < tracker.smoothed_loss < 2.0


@pytest.mark.parametrize("steps", [7, 8, 9, 100, 1001])
def test_history_is_bounded_spans_the_loop_and_keeps_the_mean(steps):
    losses = [math.sin(i) + 2 + i / 100 for i in range(steps)]
    tracker = ProgressTracker(total=2000, first_step=5, max_points=8)
    feed(tracker, losses)
    history = tracker.snapshot()["history"]
    assert len(history) <= 8 + 1  # the full points and the one being filled
    assert history[-1][0] == 5 + steps and history[-1][2] == tracker.smoothed_loss  # ends at the current step
    starts = [5] + [p[0] for p in history[:-1]]  # each point covers the steps since the previous one
    covered = [end - start for start, (end, _, _) in zip(starts, history)]
    assert all(c > 0 for c in covered) and sum(covered) == steps
    assert sum(c * loss for c, (_, loss, _) in zip(covered, history)) == pytest.approx(sum(losses))
    assert len(history) >= min(steps, 4)  # merging halves a full history, never more


def test_history_points_are_exact_means_of_their_steps():
    tracker = ProgressTracker(total=100, max_points=4)
    feed(tracker, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    # 4 points of 1 step merged into 2 of 2, filled to 4 of 2, merged into 2 of 4; then steps 9-10 are open
    assert [p[:2] for p in tracker.snapshot()["history"]] == [[4, 2.5], [8, 6.5], [10, 9.5]]


def test_messages_are_throttled_but_the_first_and_last_steps_always_go():
    tracker = ProgressTracker(total=1000, min_interval_s=0.2)
    sent = []
    for i in range(1000):  # 1000 steps at 1 ms each: a fast CPU run
        feed(tracker, [1.0], seconds=0.001)
        if tracker.due(now=100.0 + i * 0.001):
            sent.append(tracker.done)
    assert sent[0] == 1 and sent[-1] == 1000
    assert 5 <= len(sent) <= 7  # one second of steps: one message per 0.2 s, plus the last
    assert all(b - a >= 200 for a, b in zip(sent, sent[1:-1]))


def test_stop_ends_the_countdown_and_is_sent_at_once():
    tracker = ProgressTracker(total=10)
    feed(tracker, [1.0, 1.0, 1.0])
    assert tracker.due(now=0.0) and not tracker.due(now=0.01)
    tracker.stop()
    assert tracker.due(now=0.02)
    assert tracker.snapshot()["running"] is False and tracker.snapshot()["step"] == 3


def test_snapshots_are_fresh_copies():
    """The snapshot is serialised later, on the server's thread, while training goes on."""
    tracker = ProgressTracker(total=10, max_points=2)
    feed(tracker, [1.0, 2.0])
    before = tracker.snapshot()
    kept = json.dumps(before)
    feed(tracker, [3.0, 4.0, 5.0])
    assert json.dumps(before) == kept


@pytest.mark.parametrize("total, max_points", [(0, 200), (10, 3), (10, 0)])
def test_rejects_impossible_settings(total, max_points):
    with pytest.raises(ValueError, match="steps" if total < 1 else "max_points"):
        ProgressTracker(total=total, max_points=max_points)


# ---------------------------------------------------------------------------------------------------------------
# TrainLoop -> bridge


class Cancel(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


class FakeRun:
    """Stands in for TrainingRun: runs `steps` instant steps, calling on_step as the trainer does; `validation`: the
    records its states carry (validation off: none)."""

    def __init__(self, validation=()):
        self.validation = list(validation)

    def train(self, handle, steps, on_step=None, should_stop=None, on_known=None):
        losses = []
        for k in range(1, steps + 1):
            losses.append(1.0 / k)
            on_step(StepInfo(handle.step + k, losses[-1], 1e-3, 0.01))
        return SimpleNamespace(step=handle.step + steps, state=SimpleNamespace(losses=losses, validation=self.validation))


@pytest.fixture
def sent(monkeypatch):
    """The events the bridge sends, and progress bars that record their updates (and cancel at step 5 if asked)."""
    events, updates = [], []
    monkeypatch.setattr(bridge, "send_event", lambda event, data: events.append((event, data)))
    monkeypatch.setattr(live, "_workflow_of", live.OrderedDict())
    monkeypatch.setattr(live, "_loops", live.OrderedDict())
    server = SimpleNamespace(last_prompt_id=queue("tiny"))  # a prompt of workflow "tiny", being run
    monkeypatch.setattr(bridge, "running_prompt_id", lambda: server.last_prompt_id)
    monkeypatch.setattr(bridge, "cached_nodes", lambda prompt_id: None)  # no prompt has run to its end
    cancel_at = []

    class Bar:
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            updates.append(value)
            if value in cancel_at:
                raise Cancel

    monkeypatch.setattr(bridge, "progress_bar", Bar)
    return SimpleNamespace(events=events, updates=updates, cancel_at=cancel_at, server=server)


def queue(workflow: str | None, prompt: dict | None = None) -> str:
    """What ComfyUI's on-prompt hook sees when the frontend queues a prompt of `workflow` (its graph id); -> the id the
    hook gives the prompt."""
    extra = {"extra_pnginfo": {"workflow": {"id": workflow}}} if workflow else {}
    return live.on_prompt({"prompt": prompt or {}, "extra_data": extra})["prompt_id"]


def shown(workflow: str) -> list[dict]:
    """What a view of `workflow` is given by the route."""
    return live.view_state(workflow)["loops"]


def test_train_loop_declares_its_node_id():
    assert TrainLoop.INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_train_loop_sends_throttled_progress_of_its_node(sent):
    handle = SimpleNamespace(run=FakeRun(), step=40)
    after, step, loss = TrainLoop().train(handle, 100, unique_id="7")
    assert (step, loss) == (140, 1.0 / 100)
    assert sent.updates == list(range(1, 101))  # the progress bar (and Cancel) still see every step
    assert {event for event, _ in sent.events} == {live.EVENT}
    messages = [data for _, data in sent.events]
    assert 2 <= len(messages) <= 10  # instant steps: the first, the last, few between
    assert messages[0]["step"] == 1 and messages[-1]["step"] == 100 and messages[-1]["run_step"] == 140
    assert all(m["node"] == "7" and m["total"] == 100 and m["workflow"] == "tiny" for m in messages)
    assert messages[-1]["running"] is False
    assert shown("tiny") == [{**messages[-1], "cached": False}]  # what a reloaded view is given


def test_a_cancelled_loop_is_shown_stopped(sent):
    sent.cancel_at.append(5)
    handle = SimpleNamespace(run=FakeRun(), step=0)
    with pytest.raises(Cancel):
        TrainLoop().train(handle, 20, unique_id="3")
    last = sent.events[-1][1]
    assert (last["step"], last["running"]) == (5, False)
    assert shown("tiny") == [{**last, "cached": False}]


def test_a_scored_loop_ends_with_its_validation_loss_and_the_best_point_so_far(sent):
    scored = [{"step": 10, "raw": 0.30, "ema": 0.32}, {"step": 20, "raw": 0.25, "ema": 0.24}]
    TrainLoop().train(SimpleNamespace(run=FakeRun(scored), step=10), 10, unique_id="3")
    last = sent.events[-1][1]
    assert (last["step"], last["running"]) == (10, False)
    assert last["validation"] == {"step": 20, "raw": 0.25, "ema": 0.24, "best": {"step": 20, "kind": "ema", "loss": 0.24}}
    assert "validation" not in sent.events[-2][1]  # the steps' own messages carry none
    assert shown("tiny") == [{**last, "cached": False}]


class StoredRun:
    """Stands in for TrainingRun when the run store holds the loop: no step runs, `on_known` gets its state."""

    def train(self, handle, steps, on_step=None, should_stop=None, on_known=None):
        state = SimpleNamespace(step=handle.step + steps, losses=[2.0] * handle.step + [1.0 / k for k in range(1, steps + 1)],
                                validation=[])
        on_known(state)
        return SimpleNamespace(step=state.step, state=state)


def test_a_loop_from_the_run_store_is_shown_loaded_with_its_whole_chart(sent):
    after, step, loss = TrainLoop().train(SimpleNamespace(run=StoredRun(), step=10), 50, unique_id="4")
    (message,) = [data for _, data in sent.events]
    assert (message["step"], message["total"], message["run_step"]) == (50, 50, 60)
    assert message["loaded"] is True and message["running"] is False and message["s_per_it"] is None
    assert [p[0] for p in message["history"]] == list(range(11, 61))  # the loop's steps, not the run's before it
    assert sent.updates == [50]


def test_replay_charts_steps_done_before_and_times_only_new_ones():
    tracker = ProgressTracker(10, first_step=5)
    tracker.replay([1.0, 0.5])  # a continued loop: 2 of its steps were done before the cancel
    assert (tracker.done, tracker.step, tracker.loss) == (2, 7, 0.5) and math.isnan(tracker.seconds_per_step)
    feed(tracker, [0.25], seconds=2.0)
    snap = tracker.snapshot()
    assert snap["step"] == 3 and snap["s_per_it"] == 2.0 and [p[0] for p in snap["history"]] == [6, 7, 8]


def test_each_workflow_sees_only_its_own_runs_though_node_ids_are_shared(sent):
    TrainLoop().train(SimpleNamespace(run=FakeRun(), step=0), 3, unique_id="5")
    TrainLoop().train(SimpleNamespace(run=FakeRun(), step=0), 3, unique_id="6")
    sent.server.last_prompt_id = queue("dev2pro")  # another workflow, whose loops have the same ids
    TrainLoop().train(SimpleNamespace(run=FakeRun(), step=0), 4, unique_id="5")
    assert [(m["node"], m["total"]) for m in shown("tiny")] == [("5", 3), ("6", 3)]
    assert [(m["node"], m["total"]) for m in shown("dev2pro")] == [("5", 4)]
    assert shown("a workflow never queued") == [] and shown(None) == []
    sent.server.last_prompt_id = queue(None)  # queued over the HTTP API, without its workflow: no graph is its
    TrainLoop().train(SimpleNamespace(run=FakeRun(), step=0), 7, unique_id="5")
    assert sent.events[-1][1]["workflow"] is None
    assert [m["total"] for m in shown("tiny") + shown("dev2pro")] == [3, 3, 4]


def test_a_later_prompt_replaces_a_loops_view_and_a_loop_served_from_the_cache_keeps_its_last_state(sent, monkeypatch):
    history = {}  # prompt id -> the nodes ComfyUI's history says it took from its cache, once it has run
    monkeypatch.setattr(bridge, "cached_nodes", history.get)
    first = sent.server.last_prompt_id
    for node in ("3", "8"):
        TrainLoop().train(SimpleNamespace(run=FakeRun(), step=0), 3, unique_id=node)
    history[first] = set()
    second = sent.server.last_prompt_id = queue("tiny")  # re-queued with loop 8 longer: loop 3 comes from the cache
    TrainLoop().train(SimpleNamespace(run=FakeRun(), step=0), 5, unique_id="8")
    assert not any(m["cached"] for m in shown("tiny"))  # still running: ComfyUI tells only the tab that queued it
    history[second] = {"1", "2", "3"}
    loop3, loop8 = shown("tiny")
    assert (loop3["prompt_id"], loop3["cached"], loop3["step"]) == (first, True, 3) and loop3["history"]
    assert (loop8["prompt_id"], loop8["cached"], loop8["total"]) == (second, False, 5)
    third = sent.server.last_prompt_id = queue("tiny")  # queued, not run yet: the second is still the last run
    assert [m["cached"] for m in shown("tiny")] == [True, False]
    history[third] = {"8"}  # a prompt of this graph that held loop 8 only, from the cache
    assert [m["cached"] for m in shown("tiny")] == [False, True]
    assert live.view_state("tiny")["prompts"] == [first, second, third]
    history[queue("dev2pro")] = {"3", "8"}  # another workflow's prompt says nothing of this one's loops
    assert [m["cached"] for m in shown("tiny")] == [False, True]


def test_progress_messages_are_numbers_only(sent):
    TrainLoop().train(SimpleNamespace(run=FakeRun(), step=0), 30, unique_id="12")
    (message,) = shown("tiny")
    ids = ("node", "prompt_id", "workflow", "history")
    leaves = [v for k, v in message.items() if k not in ids] + sum(message["history"], [])
    assert all(isinstance(v, (int, float, bool)) or v is None for v in leaves)


def test_a_queued_prompt_gets_its_id_and_the_client_may_give_it(sent):
    assert re.fullmatch(r"[0-9a-f-]{36}", queue("tiny"))
    assert live.on_prompt({"prompt": {}, "prompt_id": "mine"})["prompt_id"] == "mine"
    assert live.on_prompt({"no prompt": 1}) == {"no prompt": 1}  # ComfyUI answers that one with its own error


def test_outside_comfyui_nothing_is_sent_and_nothing_is_hooked(monkeypatch):
    monkeypatch.setattr(live, "_loops", live.OrderedDict())
    events = []
    monkeypatch.setattr(bridge, "send_event", lambda event, data: events.append(data))
    TrainLoop().train(SimpleNamespace(run=FakeRun(), step=0), 3)  # called without a node id, as scripts do
    assert events == [] and live._loops == {}
    assert bridge.register_route(live.ROUTE, live.view_state) is False
    assert bridge.add_prompt_handler(live.on_prompt) is False
    assert bridge.cached_nodes("any prompt") is None


# ---------------------------------------------------------------------------------------------------------------
# web/: what the browser loads


def test_the_extension_loads_only_comfyuis_own_scripts_and_nothing_from_outside():
    web = ROOT / pack.WEB_DIRECTORY
    scripts = sorted(web.rglob("*.js"))
    assert scripts, "ComfyUI loads every .js under WEB_DIRECTORY; there is none"
    for path in scripts:
        text = path.read_text(encoding="utf-8")
        assert "://" not in text and "@import" not in text, f"{path.name} names an outside address"
        # served as /extensions/<pack>/<path under web>: its relative imports must reach ComfyUI's /scripts/
        served = f"/extensions/pack/{path.relative_to(web).as_posix()}"
        for module in re.findall(r'^import .* from "(.+)";$', text, flags=re.M):
            assert posixpath.normpath(posixpath.join(posixpath.dirname(served), module)) in (
                "/scripts/app.js", "/scripts/api.js"), f"{path.name} imports {module}"


def test_the_extension_speaks_the_bridges_event_and_route():
    text = (ROOT / pack.WEB_DIRECTORY / "js" / "live_progress.js").read_text(encoding="utf-8")
    assert f'"{live.EVENT}"' in text and f'"{live.ROUTE}"' in text
    assert '"FluxLoRA_TrainLoop"' in text and "FluxLoRA_TrainLoop" in pack.NODE_CLASS_MAPPINGS
