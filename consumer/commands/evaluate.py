"""``shunt eval``: on labelled reviews, what each threshold gains and what it costs, and which one to set.

The arithmetic lives in :mod:`consumer.offline.evaluation`; this module gathers its inputs (the data, the small
model's predictions, the LLM's answers from a replay file, a cache or a live endpoint through the service's
own :class:`~consumer.llm.pool.LlmPool`) and writes its outputs (a table, report.json, answers.jsonl and
two plots).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from consumer.commands.common import config_option, prune, settings_from
from consumer.config import LlmConfig, Settings
from consumer.llm.prompting import Prompt, build_prompt
from consumer.offline import evaluation as ev
from consumer.offline.evaluation import EvaluationError, Kind, Record
from consumer.records import LlmFailure, LlmOutcome, Origin, Prediction, Review, Scored
from consumer.small.calibration import reliability

ANSWERS_FILE = "answers.jsonl"
REPORT_FILE = "report.json"
TRADEOFF_PLOT = "tradeoff.png"
RELIABILITY_PLOT = "reliability.png"
SERVICE_METHOD: ev.Method = "ds_plus"  # the service asks with the S4L prompt, so its threshold is DS+'s


@dataclass(frozen=True, slots=True)
class Case:
    """One labelled review with the small model's view. ``review_id``: the data's own id, if it had one."""

    scored: Scored
    review_id: str | None
    truth: str


@dataclass(frozen=True, slots=True)
class Ask:
    """One question for the LLM: a review, a prompt kind, the prompt itself and its cache key."""

    case: int
    kind: Kind
    prompt: Prompt
    key: str


@dataclass(slots=True)
class Gathered:
    """The answer to every ask, by (case index, kind), and how they were obtained."""

    records: dict[tuple[int, Kind], Record] = field(default_factory=dict)
    from_cache: int = 0
    fetched: int = 0
    spent_usd: float = 0.0


def _thresholds(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...]:
    if value is None:
        return ev.DEFAULT_THRESHOLDS
    try:
        return ev.parse_thresholds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(name="eval")
@config_option
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Labelled reviews: JSON lines {"id"?, "text", "label"}.')  # fmt: skip
@click.option("--llm-url", help="OpenAI-compatible base URL to ask live (llm.base_url).")
@click.option("--llm-model", help="Model name sent to the endpoint; also picks the price (llm.model).")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Recorded answers instead of a live LLM: JSON lines {"id"|"text", "label", "prompt"?}.')  # fmt: skip
@click.option("--cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Answers of earlier runs, read first; every answer fetched live is appended to it.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval"),
              show_default=True, help="Folder for report.json, answers.jsonl and the plots.")  # fmt: skip
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Small model folder (model.path).")  # fmt: skip
@click.option("--thresholds", callback=_thresholds, metavar="X,Y,...",
              help="Thresholds to sweep (default: 0, 0.5..0.9 by 0.05, 0.91..0.99 by 0.01, 1).")  # fmt: skip
@click.option("--cost-cap", type=click.FloatRange(min=0), metavar="RATIO",
              help="Also pick the best threshold costing at most RATIO of the LLM alone (0.3 = 30%).")  # fmt: skip
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="Log threshold (logs go to stderr).")  # fmt: skip
def command(
    config_path: Path | None,
    data: Path,
    llm_url: str | None,
    llm_model: str | None,
    replay: Path | None,
    cache: Path | None,
    out: Path,
    model_dir: Path | None,
    thresholds: tuple[float, ...],
    cost_cap: float | None,
    log_level: str,
) -> None:
    """Compare the small model alone, the LLM alone, DS and DS+ on labelled reviews across thresholds.

    Reports accuracy, macro-F1, the share sent to the LLM and the cost (USD and ratio to the LLM alone),
    chooses a threshold per goal and prints the config to set it. The LLM is asked once per review and
    prompt kind (live through the service's own pool, limits and prompts; or from --replay / --cache).
    """
    if replay is not None and (llm_url is not None or cache is not None):
        raise click.UsageError("--replay replaces the live LLM: give it without --llm-url and --cache")
    overrides = prune(
        {
            "llm": {"base_url": llm_url, "model": llm_model},
            "model": {"path": model_dir},
            "service": {"log_level": log_level},
        }
    )
    settings = settings_from(config_path, overrides)
    _check_price(settings.llm)
    source = {"replay": replay} if replay is not None else {"cache": cache}
    evaluate(settings, data, out, thresholds, cost_cap, source, Console())


def evaluate(
    settings: Settings,
    data: Path,
    out: Path,
    thresholds: Sequence[float],
    cost_cap: float | None,
    source: Mapping[str, Path | None],
    console: Console,
) -> dict[str, Any]:
    """The whole evaluation; returns the report it wrote to ``out``."""
    cases = _score(_load_reviews(data), settings)
    asks = _asks(cases, settings.llm, max(thresholds))
    replay = source.get("replay")
    gathered = _replayed(cases, asks, replay, settings.llm) if replay else _gather(asks, cases, settings, source)
    out.mkdir(parents=True, exist_ok=True)
    _write_answers(out / ANSWERS_FILE, cases, asks, gathered)
    items = _items(cases, gathered, settings.llm)
    report = _report(items, cases, asks, gathered, settings, thresholds, cost_cap, data, source)
    _plot_tradeoff(out / TRADEOFF_PLOT, report)
    _plot_reliability(out / RELIABILITY_PLOT, report)
    (out / REPORT_FILE).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _print(console, report, out)
    return report


def _check_price(llm: LlmConfig) -> None:
    if llm.model not in llm.prices:
        raise EvaluationError(
            f"no price for model {llm.model!r}: add [llm.prices.{llm.model}] with input_per_mtok and "
            f"output_per_mtok to the config (known: {', '.join(sorted(llm.prices))})"
        )


# --- inputs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Labelled:
    """One row of the data file."""

    review_id: str | None
    text: str
    label: str


def _load_reviews(path: Path) -> list[Labelled]:
    """The data file's rows; each needs a string ``text`` and ``label``; ids, when given, must be unique."""
    out, seen = [], set()
    for number, row in ev.read_json_lines(path, "data file"):
        text, label, raw_id = row.get("text"), row.get("label"), row.get("id")
        if not isinstance(text, str) or not text.strip() or not isinstance(label, str):
            raise EvaluationError(f"{path}:{number}: needs a non-empty string 'text' and a string 'label'")
        review_id = None if raw_id is None else str(raw_id)
        if review_id is not None and review_id in seen:
            raise EvaluationError(f"{path}:{number}: id {review_id!r} repeats; answers are matched by id")
        seen.add(review_id)
        out.append(Labelled(review_id, text, label))
    if not out:
        raise EvaluationError(f"{path} holds no reviews")
    return out


def _score(reviews: Sequence[Labelled], settings: Settings) -> list[Case]:
    """The small model's prediction for every review, in batches of ``model.batch_size``."""
    from consumer.small.scoring import OnnxScorer  # onnxruntime loads only when a model is really needed

    scorer = OnnxScorer.load(settings.model.path, max_tokens=settings.model.max_tokens)
    unknown = sorted({r.label for r in reviews} - set(scorer.labels))
    if unknown:
        raise EvaluationError(f"the data use labels {unknown} that the model does not know {list(scorer.labels)}")
    predictions: list[Prediction] = []
    size = settings.model.batch_size
    for start in range(0, len(reviews), size):
        predictions.extend(scorer.predict([r.text for r in reviews[start : start + size]]))
    return [
        _case(number, review, prediction)
        for number, (review, prediction) in enumerate(zip(reviews, predictions, strict=True))
    ]


def _case(number: int, review: Labelled, prediction: Prediction) -> Case:
    # The pool's logs bind topic/partition/offset: the data file stands in for the topic, the row for the offset.
    review_id = review.review_id if review.review_id is not None else f"row-{number + 1}"
    origin = Origin(topic="eval", partition=0, offset=number)
    return Case(Scored(Review(review_id, review.text, origin), prediction), review.review_id, review.label)


def _asks(cases: Sequence[Case], llm: LlmConfig, highest: float) -> list[Ask]:
    """The plain prompt for every review; the S4L prompt for every review some threshold sends to the LLM."""
    asks = []
    for number, case in enumerate(cases):
        kinds: tuple[Kind, ...] = ("plain", "s4l") if case.scored.prediction.confidence < highest else ("plain",)
        for kind in kinds:
            prompt = _prompt(case.scored, kind, llm)
            asks.append(Ask(number, kind, prompt, ev.question_key(prompt, llm.model)))
    return asks


def _prompt(scored: Scored, kind: Kind, llm: LlmConfig) -> Prompt:
    # Built exactly as LlmPool builds it, so the key names the question the pool really sends.
    probs = scored.prediction.probs
    return build_prompt(scored.review.text, probs, kind, prompt_mass=llm.prompt_mass, hint=llm.hint)


# --- answers --------------------------------------------------------------------------------------------------


def _replayed(cases: Sequence[Case], asks: Sequence[Ask], path: Path, llm: LlmConfig) -> Gathered:
    """Every answer from the replay file; EvaluationError when any is missing."""
    book = ev.ReplayBook.load(path)
    gathered, missing = Gathered(), []
    for ask in asks:
        case = cases[ask.case]
        row = book.find(case.review_id, case.scored.review.text, ask.kind)
        if row is None:
            missing.append(f"{ask.kind} answer for {case.scored.review.id}")
            continue
        gathered.records[(ask.case, ask.kind)] = ev.replayed_record(row, ask.prompt, llm.model)
    if missing:
        raise EvaluationError(
            f"replay file {path} lacks {len(missing)} answer(s), e.g. {', '.join(missing[:3])}; "
            "record them with a live run (--llm-url) or widen the replay file"
        )
    return gathered


def _gather(
    asks: Sequence[Ask], cases: Sequence[Case], settings: Settings, source: Mapping[str, Path | None]
) -> Gathered:
    """Answers from the cache first, the rest live, each unique question asked once."""
    cache_path = source.get("cache")
    cache = ev.AnswerCache(cache_path) if cache_path is not None else None
    try:
        known, todo = _split_known(asks, cache)
        gathered = Gathered(from_cache=len(known))
        if todo:
            fetched = asyncio.run(_fetch_all(settings.llm, list(todo.values()), cases, known, cache))
            gathered.fetched, gathered.spent_usd = len(todo), fetched
    finally:
        if cache is not None:
            cache.close()
    for ask in asks:
        gathered.records[(ask.case, ask.kind)] = known[ask.key]
    return gathered


def _split_known(asks: Sequence[Ask], cache: ev.AnswerCache | None) -> tuple[dict[str, Record], dict[str, Ask]]:
    """(answers the cache has, by key; one ask per question it does not have, by key)."""
    known: dict[str, Record] = {}
    todo: dict[str, Ask] = {}
    for ask in asks:
        hit = cache.get(ask.key) if cache is not None else None
        if hit is not None:
            known[ask.key] = hit
        else:
            todo.setdefault(ask.key, ask)
    return known, todo


async def _fetch_all(
    llm: LlmConfig, todo: Sequence[Ask], cases: Sequence[Case], known: dict[str, Record], cache: ev.AnswerCache | None
) -> float:
    """Ask the LLM every question in ``todo`` through the service's pool; returns what the pool spent."""
    from consumer.llm.pool import LlmPool  # aiohttp and the pool load only for a live run

    def done(ask: Ask, outcome: LlmOutcome) -> None:
        known[ask.key] = record = _record(outcome, ask, llm.model)
        if cache is not None:
            cache.add(ask.key, record)  # at once: an interrupted run keeps what it paid for

    # The evaluation asks each question once itself; the pool's in-memory cache would only zero the costs.
    config = llm.model_copy(update={"cache_size": 0})
    with _progress() as progress:
        task = progress.add_task("asking the LLM", total=len(todo))
        async with LlmPool(config) as pool:
            pending = iter(todo)

            async def feed() -> None:
                for ask in pending:  # one iterator shared by the feeders: each ask is taken once
                    done(ask, await pool.label(cases[ask.case].scored, prompt=ask.kind))
                    progress.advance(task)

            async with asyncio.TaskGroup() as group:
                for _ in range(min(len(todo), 2 * config.max_concurrency)):  # keeps every worker busy
                    group.create_task(feed())
            return pool.stats().cost_usd


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )  # fmt: skip


def _record(outcome: LlmOutcome, ask: Ask, model: str) -> Record:
    if isinstance(outcome, LlmFailure):
        # The pool reports a failure's cost but not its tokens; it stays out of the methods' cost (and is
        # in spent_usd), and the review gets the fallback the service would publish.
        return Record(None, 0, 0, ask.prompt.version, model, outcome.reason)
    return Record(outcome.label, outcome.prompt_tokens, outcome.completion_tokens, outcome.prompt_version, model)


def _write_answers(path: Path, cases: Sequence[Case], asks: Sequence[Ask], gathered: Gathered) -> None:
    """Every answer of the run, in the replay format, so ``--replay`` reproduces the run."""
    lines = []
    for ask in asks:
        case = cases[ask.case]
        row = ev.replay_row(case.review_id, case.scored.review.text, ask.kind, gathered.records[(ask.case, ask.kind)])
        lines.append(orjson.dumps(row) + b"\n")
    path.write_bytes(b"".join(lines))


def _items(cases: Sequence[Case], gathered: Gathered, llm: LlmConfig) -> list[ev.Item]:
    price = llm.price()

    def answer(number: int, kind: Kind) -> ev.Answer | None:
        record = gathered.records.get((number, kind))
        return None if record is None else ev.Answer(record.label, record.cost(price))

    out = []
    for number, case in enumerate(cases):
        plain = answer(number, "plain")
        assert plain is not None  # every review was asked the plain prompt
        prediction = case.scored.prediction
        out.append(ev.Item(case.truth, prediction.label, prediction.confidence, plain, answer(number, "s4l")))
    return out


# --- the report -------------------------------------------------------------------------------------------------


def _report(
    items: Sequence[ev.Item],
    cases: Sequence[Case],
    asks: Sequence[Ask],
    gathered: Gathered,
    settings: Settings,
    thresholds: Sequence[float],
    cost_cap: float | None,
    data: Path,
    source: Mapping[str, Path | None],
) -> dict[str, Any]:
    return {
        "report_version": ev.REPORT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": {"path": str(data), "reviews": len(cases), "labels": ev.labels_of(items)},
        "small_model": {"path": str(settings.model.path), "version": cases[0].scored.prediction.model_version},
        "llm": _llm_meta(settings.llm, asks, source),
        "answers": _answers_meta(asks, gathered),
        "thresholds": list(thresholds),
        "cost_cap": cost_cap,
        **_results(items, thresholds, cost_cap),
        "plots": {"tradeoff": TRADEOFF_PLOT, "reliability": RELIABILITY_PLOT},
    }


def _llm_meta(llm: LlmConfig, asks: Sequence[Ask], source: Mapping[str, Path | None]) -> dict[str, Any]:
    replay, cache = source.get("replay"), source.get("cache")
    return {
        "model": llm.model,
        "source": "replay" if replay is not None else "live",
        "base_url": None if replay is not None else llm.base_url,
        "replay": None if replay is None else str(replay),
        "cache": None if cache is None else str(cache),
        "prompt_versions": {ask.kind: ask.prompt.version for ask in asks},
        "price_per_mtok": llm.price().model_dump(),
    }


def _answers_meta(asks: Sequence[Ask], gathered: Gathered) -> dict[str, Any]:
    records = gathered.records
    return {
        "file": ANSWERS_FILE,
        "plain": sum(1 for ask in asks if ask.kind == "plain"),
        "s4l": sum(1 for ask in asks if ask.kind == "s4l"),
        "questions": len({ask.key for ask in asks}),
        "from_cache": gathered.from_cache,
        "fetched": gathered.fetched,
        "failed": sum(1 for record in records.values() if record.label is None),
        "spent_usd": gathered.spent_usd,
    }


def _results(items: Sequence[ev.Item], thresholds: Sequence[float], cost_cap: float | None) -> dict[str, Any]:
    llm = ev.llm_alone(items)
    swept = ev.sweep(items, thresholds)
    found = {method: ev.choices(swept[method], method, llm.accuracy, cost_cap) for method in swept}
    bins = reliability([i.confidence for i in items], [i.small == i.truth for i in items])
    return {
        "small_alone": ev.point_json(ev.small_alone(items)),
        "llm_alone": ev.point_json(llm),
        "sweep": ev.sweep_json(swept),
        "choices": {method: [ev.choice_json(c) for c in chosen] for method, chosen in found.items()},
        "recommended": ev.choice_json(ev.recommended(found[SERVICE_METHOD], cost_cap)),
        "calibration": ev.calibration_json(bins, RELIABILITY_PLOT),
    }


# --- the terminal --------------------------------------------------------------------------------------------------


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _print(console: Console, report: Mapping[str, Any], out: Path) -> None:
    console.print(_baselines_table(report))
    console.print(_sweep_table(report))
    console.print(_choices_table(report))
    pick = report["recommended"]
    if pick["point"] is None:
        console.print("[yellow]No swept threshold meets the goal; see the table above.[/]")
    else:
        console.print(f"Set it ({pick['point']['name']}, {ev.GOALS[pick['goal']]}):")
        console.print(pick["toml"], markup=False, highlight=False)
        console.print(f"or  {pick['env']}", markup=False, highlight=False)
    answers = report["answers"]
    if answers["failed"]:
        retry = (
            "record them again live" if report["llm"]["source"] == "replay" else "rerun with --cache to ask only them"
        )
        console.print(
            f"[yellow]{answers['failed']} question(s) have no LLM answer (DS/DS+ keep the small label, the LLM "
            f"alone counts them wrong); {retry}.[/]"
        )
    console.print(f"Wrote {out / REPORT_FILE}, {out / ANSWERS_FILE}, {out / TRADEOFF_PLOT}, {out / RELIABILITY_PLOT}")


def _baselines_table(report: Mapping[str, Any]) -> Table:
    data, llm, answers = report["data"], report["llm"], report["answers"]
    model = report["small_model"]["version"]
    title = f"{data['reviews']} reviews · small model {model} · LLM {llm['model']} ({llm['source']})"
    caption = (
        f"{answers['questions']} LLM questions: {answers['from_cache']} from the cache, {answers['fetched']} asked "
        f"now (${answers['spent_usd']:.4f}), {answers['failed']} failed"
    )
    table = Table(title=title, caption=caption)
    for name in ("method", "accuracy", "macro-F1", "to LLM", "cost (USD)", "cost ratio"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for point in (report["small_alone"], report["llm_alone"]):
        table.add_row(point["name"], _pct(point["accuracy"], 2), f"{point['macro_f1']:.4f}",
                      _pct(point["llm_share"]), f"{point['cost_usd']:.4f}", _pct(point["cost_ratio"]))  # fmt: skip
    return table


def _sweep_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="DS (plain prompt) and DS+ (S4L prompt) by threshold; cost is the ratio to the LLM alone")
    for name in ("threshold", "to LLM", "DS acc", "DS F1", "DS cost", "DS+ acc", "DS+ F1", "DS+ cost"):
        table.add_column(name, justify="right")
    llm_accuracy = report["llm_alone"]["accuracy"]
    chosen = report["recommended"]["threshold"]
    for row in report["sweep"]:
        ds, plus = row["ds"], row["ds_plus"]
        cells = [f"{row['threshold']:g}", _pct(ds["llm_share"])]
        for point in (ds, plus):
            accent = "green" if point["accuracy"] >= llm_accuracy else ""  # at least as accurate as the LLM alone
            cells += [f"[{accent}]{_pct(point['accuracy'], 2)}[/]" if accent else _pct(point["accuracy"], 2),
                      f"{point['macro_f1']:.4f}", _pct(point["cost_ratio"])]  # fmt: skip
        table.add_row(*cells, style="bold" if row["threshold"] == chosen else None)
    return table


def _choices_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Threshold by goal (bold in the sweep: the recommended one)")
    for name in ("goal", "method", "threshold", "accuracy", "cost ratio"):
        table.add_column(name, justify="left" if name in ("goal", "method") else "right")
    for method, chosen in report["choices"].items():
        for choice in chosen:
            point = choice["point"]
            if point is None:
                table.add_row(choice["description"], ev.METHOD_NAMES[method], "none", "-", "-")
                continue
            table.add_row(choice["description"], point["name"], f"{point['threshold']:g}",
                          _pct(point["accuracy"], 2), _pct(point["cost_ratio"]))  # fmt: skip
    return table


# --- the plots -------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, without pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise EvaluationError("the plots need matplotlib: pip install 'data-shunt[train]'") from None
    figure = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(figure)
    return figure


_STYLES = {
    "ds": {"color": "#1f77b4", "marker": "o", "linestyle": "-", "markersize": 5},
    "ds_plus": {"color": "#d62728", "marker": "s", "linestyle": "--", "markersize": 4},
}


def _plot_tradeoff(path: Path, report: Mapping[str, Any]) -> None:
    """Accuracy against cost ratio: a curve per method, the two baselines as points, the pick annotated."""
    figure = _figure(8, 5.5)
    axes = figure.subplots()
    for method, style in _STYLES.items():
        points = sorted((row[method] for row in report["sweep"]), key=lambda p: (p["cost_ratio"], p["accuracy"]))
        axes.plot([100 * p["cost_ratio"] for p in points], [100 * p["accuracy"] for p in points],
                  label=f"{ev.METHOD_NAMES[method]} (threshold swept)", **style)  # fmt: skip
    small, llm = report["small_alone"], report["llm_alone"]
    axes.scatter(
        [0], [100 * small["accuracy"]], marker="^", s=130, color="#2ca02c", zorder=5, label="small model alone"
    )
    axes.scatter([100], [100 * llm["accuracy"]], marker="*", s=260, color="#7f7f7f", zorder=5, label="LLM alone")
    axes.axhline(100 * llm["accuracy"], color="#7f7f7f", linestyle=":", linewidth=1)
    _annotate_pick(axes, report["recommended"])
    axes.set_xlabel("cost, % of the LLM alone")
    axes.set_ylabel("accuracy, %")
    axes.set_title(f"Accuracy vs cost on {report['data']['reviews']} reviews (LLM: {report['llm']['model']})")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def _annotate_pick(axes: Any, pick: Mapping[str, Any]) -> None:
    point = pick["point"]
    if point is None:
        return
    x, y = 100 * point["cost_ratio"], 100 * point["accuracy"]
    text = f"{point['name']} threshold {point['threshold']:g}\n{y:.2f}% at {x:.1f}% of the LLM cost"
    axes.annotate(text, xy=(x, y), xytext=(40, -60), textcoords="offset points", fontsize=9,
                  bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
                  arrowprops={"arrowstyle": "->", "color": "black"})  # fmt: skip
    axes.scatter([x], [y], s=160, facecolors="none", edgecolors="black", linewidths=1.5, zorder=6)


def _plot_reliability(path: Path, report: Mapping[str, Any]) -> None:
    """Accuracy by confidence bin against the diagonal, with the bins' counts underneath."""
    calibration = report["calibration"]
    bins = calibration["table"]
    figure = _figure(6, 6.5)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    full = [b for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"]
    top.bar([b["low"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
            color="#1f77b4", edgecolor="black", label="accuracy in the bin")  # fmt: skip
    top.plot([0, 1], [0, 1], color="#7f7f7f", linestyle="--", label="perfect calibration")
    # The red marks sit at each bin's mean confidence: a bar below its mark is overconfident, above it under.
    top.scatter([(b["low"] + b["high"]) / 2 for b in full], [b["confidence"] for b in full], color="#d62728",
                marker="_", s=250, linewidths=2.5, zorder=5, label="mean confidence in the bin")  # fmt: skip
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(f"Small model reliability, {calibration['bins']} bins: ECE {100 * calibration['ece']:.2f}%")
    bottom.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color="#aec7e8",
               edgecolor="black")  # fmt: skip
    bottom.set_xlabel("confidence (top softmax probability, calibrated)")
    bottom.set_ylabel("reviews")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    figure.savefig(path)
