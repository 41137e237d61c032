"""Load and validate the study config, and expand it into the table of runs.

The same code serves the Snakefile (through rules/common.smk) and the stage CLIs, so a config error
reads the same wherever it is found: one line naming the key, what was expected, and where to fix it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import itertools
import json
import math
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lcnn.utils import LcnnError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"
BASELINE = "baseline"
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@cache
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_defaults(section: str) -> dict[str, Any]:
    """The schema's default of every key of a section (``data`` or nested: ``data.imagenet``).

    Stage CLIs run alone take their defaults from here, so the schema is the one place that holds them.
    """
    node = schema()
    for part in section.split("."):
        node = node["properties"][part]
    props = node["properties"]
    return {key: copy.deepcopy(sub["default"]) for key, sub in props.items() if "default" in sub}


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` onto ``base`` in place the way Snakemake merges config files: dicts recurse, the rest replaces."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = value
    return base


def load_config(paths: list[str | Path]) -> dict[str, Any]:
    """The config files merged in order, as ``snakemake --configfile a b ...`` merges them, then validated."""
    cfg: dict[str, Any] = {}
    for path in paths:
        merge_config(cfg, yaml.safe_load(Path(path).read_text()) or {})
    return validate(cfg)


def validate_section(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked as config section ``section`` (one-line error naming the key), over its defaults."""
    wrapper = {"$defs": schema()["$defs"], "type": "object", "properties": {section: schema()["properties"][section]}}
    errors = sorted(jsonschema.Draft202012Validator(wrapper).iter_errors({section: values}), key=lambda e: len(e.path))
    if errors:
        raise LcnnError(_describe(errors[0]))
    return {**schema_defaults(section), **copy.deepcopy(values)}


def load(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise LcnnError(f"config file {path} does not exist; pass the study's config.yaml")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise LcnnError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
    return validate(cfg)


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate ``cfg`` against the JSON schema, fill defaults in place, and check cross-references."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), list(map(str, e.path))))
    if errors:
        raise LcnnError(_describe(errors[0]))
    _fill_defaults(cfg, schema())
    _check_references(cfg)
    return cfg


def _describe(err: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        hint = _home_of(extra[0]) if extra else ""
        return f"config key '{where + '.' if where != '<top level>' else ''}{extra[0]}' is not allowed here{hint}"
    if err.validator == "enum":
        return f"config key '{where}' is {err.instance!r}; expected one of {', '.join(map(str, err.validator_value))}"
    if err.validator == "type":
        return f"config key '{where}' is {err.instance!r}; expected {err.validator_value}"
    if err.validator == "required":
        return f"config section '{where}' is missing a required key: {err.message.split(chr(39))[1]}"
    if err.validator == "uniqueItems":
        return f"config key '{where}' lists the same value twice ({err.instance!r}); remove the repeat"
    if err.validator == "pattern":
        return f"config key '{where}' = {err.instance!r} must match {err.validator_value} (path-safe names only)"
    return f"config key '{where}': {err.message}"


def _home_of(key: str) -> str:
    """Say where a misplaced key belongs, e.g. 'epochs' under 'train' belongs in 'baseline'."""
    props = schema()["properties"]
    homes = [name for name, sub in props.items() if key in sub.get("properties", {})]
    if key in schema()["$defs"]["hparams"]["properties"]:
        homes.insert(0, "baseline (or a variant)")
    if homes:
        return f"; it belongs under {' or '.join(homes)}"
    close = [k for name, sub in props.items() for k in sub.get("properties", {}) if _similar(k, key)]
    return f"; did you mean {close[0]}?" if close else "; remove it or check the spelling against config.yaml"


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() > 0.75


def _fill_defaults(node: Any, sch: dict[str, Any]) -> None:
    if not isinstance(node, dict):
        return
    for key, sub in sch.get("properties", {}).items():
        if "$ref" in sub:
            sub = {**schema()["$defs"][sub["$ref"].rsplit("/", 1)[1]], **sub}
        if key not in node and "default" in sub and sub["default"] is not None and key != "axis":
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            _fill_defaults(node[key], sub)


def _check_grid(cfg: dict[str, Any]) -> None:
    """Each grid key must be a hyperparameter and each of its values valid for it, as in a variant."""
    hp_schema = schema()["$defs"]["hparams"]
    names = sorted(set(hp_schema["properties"]) - {"axis"})
    check = jsonschema.Draft202012Validator({"$defs": schema()["$defs"], "$ref": "#/$defs/hparams"})
    for key, values in (cfg.get("grid") or {}).items():
        if key not in names:
            near = [n for n in names if _similar(n, key)]
            hint = f"did you mean {near[0]}?" if near else f"use one of {', '.join(names)}"
            raise LcnnError(f"config key 'grid.{key}' is not a hyperparameter; {hint}")
        for value in values:
            errors = list(check.iter_errors({key: value}))
            if errors:
                raise LcnnError(_describe(errors[0]).replace(f"config key '{key}", f"config key 'grid.{key}", 1))


def _check_references(cfg: dict[str, Any]) -> None:
    _check_grid(cfg)
    clash = sorted(set(cfg["variants"]) & set(grid_variants(cfg)))
    if clash:
        raise LcnnError(f"variant '{clash[0]}' has the name of a generated grid variant; rename it in variants")
    for key in ("models", "variants"):
        chosen = (cfg.get("select") or {}).get(key) or []
        known = set(cfg[key]) | ({BASELINE} if key == "variants" else set()) | set(grid_variants(cfg))
        for name in chosen:
            if name not in known:
                raise LcnnError(f"select.{key} names '{name}', which is not in {key}; use one of {sorted(known)}")
    if BASELINE in cfg["variants"]:
        raise LcnnError("variants must not redefine 'baseline'; edit the baseline section instead")
    bench = cfg["benchmark"]["variant"]
    if bench not in variant_names(cfg):
        raise LcnnError(f"benchmark.variant '{bench}' is not a selected variant; use baseline or one of variants")
    lo, hi = cfg["report"]["gain_range"]
    if lo > hi:
        raise LcnnError(f"report.gain_range [{lo}, {hi}] runs backwards; write it as [{hi}, {lo}]")
    for name in cfg["report"]["fast_models"]:
        if name not in cfg["models"]:
            raise LcnnError(f"report.fast_models names '{name}', which is not in models")
    check_search(cfg)


def check_models(cfg: dict[str, Any], cache_dir: str | Path | None = None) -> None:
    """Fail early on a timm name that does not exist, without importing timm into the caller.

    timm (and torch under it) takes seconds to import, and the Snakefile runs this check while it parses. So the
    names are checked in a subprocess (in process where timm is already loaded), and with ``cache_dir`` a success is
    remembered there, keyed by the names and timm's version: the next parse of the same study skips the subprocess.
    """
    specs = [cfg["models"][m] for m in selected_models(cfg)]
    # architectures, and each with its pretrained tag (every run is normalised and cropped like those weights)
    tagged = {f"{s['timm']}.{s['pretrained_tag']}" for s in specs if s.get("pretrained_tag")}
    names = sorted({s["timm"] for s in specs} | tagged)
    try:
        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        raise LcnnError("timm is not installed; install the environment in envs/lcnn.yaml") from None
    key = hashlib.sha256(json.dumps([version, names]).encode()).hexdigest()[:16]
    stamp = Path(cache_dir) / f"timm_models_ok_{key}" if cache_dir else None
    if stamp is not None and stamp.is_file():
        return
    unknown = set(_unknown_timm_names(names))
    for name in selected_models(cfg):
        timm_name = cfg["models"][name]["timm"]
        if timm_name in unknown:
            raise LcnnError(f"models.{name}.timm = '{timm_name}' is not a timm model; pick one from timm.list_models()")
        tag = cfg["models"][name].get("pretrained_tag")
        if tag and f"{timm_name}.{tag}" in unknown:
            raise LcnnError(
                f"models.{name}.pretrained_tag = '{tag}' is not a timm pretrained tag of {timm_name}; pick one from "
                f"timm.list_pretrained('{timm_name}.*') or null"
            )
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"timm": version, "models": names}) + "\n")


def _unknown_timm_names(names: list[str]) -> list[str]:
    if "timm" in sys.modules:
        timm = sys.modules["timm"]
        return [n for n in names if not (timm.is_model(n) and ("." not in n or timm.list_pretrained(n)))]
    code = (
        "import json, sys, timm; print(json.dumps([n for n in sys.argv[1:] "
        "if not (timm.is_model(n) and ('.' not in n or timm.list_pretrained(n)))]))"
    )
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LcnnError(f"importing timm to check the model names failed ({tail}); check the environment")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def grid_variants(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Expand the cartesian ``grid`` section into path-safe variant names."""
    grid = cfg.get("grid") or {}
    if not grid:
        return {}
    keys = sorted(grid)
    out = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "grid_" + "_".join(f"{k}-{_slug(v)}" for k, v in zip(keys, values))
        if name in out:
            raise LcnnError(
                f"two grid points are both named {name} ({out[name]} and {dict(zip(keys, values))}); "
                "make the grid's values differ in their letters and digits"
            )
        out[name] = {"axis": "grid", **dict(zip(keys, values))}
    return out


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(value)).strip("-") or "none"


def all_variants(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {BASELINE: {"axis": BASELINE}, **cfg["variants"], **grid_variants(cfg)}


def variant_names(cfg: dict[str, Any]) -> list[str]:
    chosen = (cfg.get("select") or {}).get("variants")
    names = list(all_variants(cfg))
    if chosen:
        names = [BASELINE] + [n for n in names if n in chosen and n != BASELINE]
    return names


def selected_models(cfg: dict[str, Any]) -> list[str]:
    chosen = (cfg.get("select") or {}).get("models")
    return [m for m in cfg["models"] if not chosen or m in chosen]


def hparams(cfg: dict[str, Any], variant: str) -> dict[str, Any]:
    """The baseline with ``variant``'s overrides merged on top (the variant's axis included)."""
    variants = all_variants(cfg)
    if variant not in variants:
        raise LcnnError(f"unknown variant '{variant}'; configured variants: {', '.join(variants)}")
    merged = {**copy.deepcopy(cfg["baseline"]), **copy.deepcopy(variants[variant])}
    merged.setdefault("axis", BASELINE)
    return merged


def runs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per training job: model x variant x seed."""
    return [
        {"model": m, "variant": v, "seed": s, "axis": hparams(cfg, v)["axis"]}
        for m in selected_models(cfg)
        for v in variant_names(cfg)
        for s in cfg["seeds"]
    ]


# train settings that change the trained weights; the rest of `train:` (log_every, num_workers, keep_checkpoint,
# channels_last, device) only changes how a job runs, so editing it never retrains anything
RECIPE_TRAIN_KEYS = (
    "precision",
    "gpus_per_job",
    "grad_clip",
    "max_steps_per_epoch",
    "prefetcher",
    "fused_optimizer",
    "precise_bn_batches",
)


# What each lr schedule reads (lcnn.recipe.build_scheduler, through timm's create_scheduler_v2): cosine and tanh take
# no decay setting (their cycle_decay is timm's default, not decay_rate), step and multistep no min_lr, and "none"
# builds no scheduler at all. A setting left out here is never handed to that schedule's timm scheduler.
SCHEDULE_KEYS = ("warmup_epochs", "warmup_lr", "min_lr", "decay_epochs", "decay_milestones", "decay_rate")
SCHEDULE_USES = {
    "step": {"warmup_epochs", "warmup_lr", "decay_epochs", "decay_rate"},
    "multistep": {"warmup_epochs", "warmup_lr", "decay_milestones", "decay_rate"},
    "cosine": {"warmup_epochs", "warmup_lr", "min_lr"},
    "tanh": {"warmup_epochs", "warmup_lr", "min_lr"},
    "poly": {"warmup_epochs", "warmup_lr", "min_lr", "decay_rate"},  # decay_rate is poly's power
    "none": set(),
}
# timm optimizers without momentum (create_optimizer_v2 passes it only where has_momentum; tests check the registry)
NO_MOMENTUM_OPTS = frozenset({"adam", "adamw", "lamb", "lambw", "lion", "adabelief", "adafactor", "nadamw", "adan"})
# and without an epsilon (create_optimizer_v2 drops eps where not has_eps; tests check the registry)
NO_EPS_OPTS = frozenset({"sgd", "momentum", "nesterov", "lion"})


def unused_hparams(hp: dict[str, Any]) -> set[str]:
    """The hyperparameters a run with these settings provably never reads, so its weights cannot depend on them.

    Kept deliberately narrow: a key left here that matters would train the wrong recipe, one kept needlessly only
    costs a rerun. lcnn.recipe and lcnn.models default every key dropped here.
    """
    unused = set(SCHEDULE_KEYS) - SCHEDULE_USES.get(hp.get("sched"), set(SCHEDULE_KEYS))
    if not hp.get("warmup_epochs"):  # timm's schedulers read warmup_lr_init only while t < warmup_t
        unused.add("warmup_lr")
    opt = str(hp.get("opt")).lower().split("_")[-1]  # a "lookahead_" prefix wraps the named optimizer
    if opt in NO_MOMENTUM_OPTS:
        unused.add("momentum")
    if hp.get("opt_eps") is None or opt in NO_EPS_OPTS:
        unused.add("opt_eps")  # timm's default epsilon, or none taken: a recipe from before the key reads alike
    if hp.get("lr_scale") == "none":  # lr_base applies at every global batch
        unused.add("lr_base_size")
    if hp.get("init") != "pretrained":
        unused.add("pretrained_file")
    if hp.get("auto_augment") and "3a" not in hp["auto_augment"]:  # timm's create_transform drops colour jitter
        unused.add("color_jitter")
    return unused


def used_hparams(hp: dict[str, Any]) -> dict[str, Any]:
    """``hp`` without the keys :func:`unused_hparams` names."""
    unused = unused_hparams(hp)
    return {k: v for k, v in hp.items() if k not in unused}


def rule_marks(hp: dict[str, Any]) -> dict[str, str]:
    """Marks of rules whose meaning changed with no setting changing (2026-12-07), in the runs they touch, so a run
    trained under the old rule reruns and its saved state (``lcnn.train.identity``) is refused, instead of the
    old and the new standing as seeds of one variant: Kaiming re-init counts a grouped conv's fan-out per group
    (as timm's own init), and RandAugment/AutoAugment fill shifted-in pixels with the model's mean also under the
    prefetcher."""
    marks = {}
    if hp.get("init") == "kaiming":
        marks["kaiming_fan_out"] = "per_group"
    if hp.get("auto_augment"):
        marks["augment_fill"] = "model_mean"
    return marks


def run_recipe(
    cfg: dict[str, Any], model: str, variant: str, seed: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What one training job's weights depend on: model, variant recipe, seed, precision and device count.

    The train rule hands it over as a params value, so editing any of it (and nothing else) reruns the job. It
    carries only the settings this run uses: of the hyperparameters, those :func:`used_hparams` keeps
    (``overrides``, an optuna trial's values, go on first).
    """
    if model not in cfg["models"]:
        raise LcnnError(f"unknown model '{model}'; configured models: {', '.join(cfg['models'])}")
    spec = cfg["models"][model]
    hp = hparams(cfg, variant) | copy.deepcopy(overrides or {})
    recipe = {
        "model": model,
        "timm_name": spec["timm"],
        "native_img_size": spec.get("img_size", 224),
        "variant": variant,
        "seed": int(seed),
        "hparams": used_hparams(hp) | rule_marks(hp),
        "train": {k: copy.deepcopy(cfg["train"][k]) for k in RECIPE_TRAIN_KEYS},
        # every run of a model takes its input normalisation and evaluation crop from these weights' config (so
        # the initialization axis compares like with like); init: pretrained also loads them
        "pretrained_tag": spec.get("pretrained_tag"),
    }
    return recipe


def recipe_changes(saved: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """The settings where a run's saved config (its ``config.json``) differs from ``recipe`` (a :func:`run_recipe`;
    only the keys it has are compared, and a config saved before recipes dropped unused hyperparameters compares
    by the ones it used)."""
    old_train = saved.get("train") or {}
    changed = [k for k in recipe if k not in ("train", "hparams") and saved.get(k) != recipe[k]]
    changed += [f"train.{k}" for k, v in (recipe.get("train") or {}).items() if old_train.get(k) != v]
    if "hparams" in recipe:
        old_hp, new_hp = used_hparams(saved.get("hparams") or {}), recipe["hparams"]
        changed += [f"hparams.{k}" for k in sorted(old_hp.keys() | new_hp.keys()) if old_hp.get(k) != new_hp.get(k)]
    return changed


def run_execution(cfg: dict[str, Any]) -> dict[str, Any]:
    """How every training job runs (the same for all): the rest of ``train:`` and where the prepared data is."""
    train = {k: copy.deepcopy(v) for k, v in cfg["train"].items() if k not in RECIPE_TRAIN_KEYS}
    return {"train": train, "data_root": cfg["data"]["root"], "data_stage_to": cfg["data"].get("stage_to")}


def merge_run(recipe: dict[str, Any], execution: dict[str, Any]) -> dict[str, Any]:
    """One job's full run config: its recipe with the study's execution settings."""
    return {**recipe, **execution, "train": {**execution["train"], **recipe["train"]}}


def run_config(cfg: dict[str, Any], model: str, variant: str, seed: int) -> dict[str, Any]:
    """Everything one training job needs, resolved: recipe and execution settings together."""
    return merge_run(run_recipe(cfg, model, variant, seed), run_execution(cfg))


# data: keys that say where things live, not what the prepared subset is: where it is prepared, where jobs copy it,
# and where the raw ImageNet folders are mounted
DATA_LOCATION_KEYS = ("root", "stage_to", "imagenet")


def data_definition(cfg: dict[str, Any], with_root: bool = False) -> dict[str, Any]:
    """What the prepared subset is (source, classes, images per class, size, seed, ...): ``data:`` without the
    :data:`DATA_LOCATION_KEYS`; ``with_root`` (prepare_data's params) keeps ``root`` and the raw ImageNet paths.

    prepare_data takes it with them as its params; the rules that read the manifests (train, train_rung,
    train_trial, benchmark) take it without, so a changed subset retrains while a moved, touched or re-copied
    one (or moved raw ImageNet folders) does not (their manifest inputs are ancient()).
    """
    left_out = {"stage_to"} if with_root else set(DATA_LOCATION_KEYS)
    return {k: copy.deepcopy(v) for k, v in cfg["data"].items() if k not in left_out}


def prepared_definition(root: str | Path) -> dict[str, Any] | None:
    """The definition a prepared subset was drawn under: its ``prepare_report.json``'s config without the
    :data:`DATA_LOCATION_KEYS`; None when there is no readable report."""
    try:
        recorded = json.loads((Path(root) / "prepare_report.json").read_text())["config"]
        return {k: v for k, v in recorded.items() if k not in DATA_LOCATION_KEYS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def data_redefined(cfg: dict[str, Any]) -> bool:
    """Whether the subset prepared under ``data.root`` was drawn under another definition than the config's now
    (the config its prepare_report.json records); False when there is no readable report to compare with.

    The rules that read the manifests take them as ancient() only while this is False: Snakemake does not check
    the params of a job downstream of one that reruns when its inputs from it are all ancient, so a changed subset
    must reach them as an updated input instead.
    """
    recorded = prepared_definition(cfg["data"]["root"])
    return recorded is not None and recorded != data_definition(cfg)


# ------------------------------------------------------------------------------------------ search (halving)
def search_mode(cfg: dict[str, Any]) -> str:
    """``grid`` (every variant to the full budget) or ``halving`` (successive halving over rungs)."""
    return (cfg.get("search") or {}).get("mode", "grid")


def pinned_variants(cfg: dict[str, Any]) -> list[str]:
    """Variants halving always carries to the full budget: the baseline (gains are measured against it) and the
    benchmarked variant (its weights are timed). They compete like the others; losing only makes them references."""
    return list(dict.fromkeys([BASELINE, cfg["benchmark"]["variant"]]))


def rung_schedule(cfg: dict[str, Any]) -> list[int]:
    """Total epochs trained by the end of each halving rung; the last entry is always ``baseline.epochs``.

    ``search.rung_epochs`` lists the rungs that end in a selection; the full budget is appended when it is not
    already last. Without it, rungs are eta-spaced (E/eta^k, ..., E/eta) with k the number of selections that
    take the candidates down to one, so each rung costs about the same.
    """
    search = cfg.get("search") or {}
    budget, eta = cfg["baseline"]["epochs"], search.get("eta", 3)
    rungs = list(search.get("rung_epochs") or [])
    if not rungs:
        n, k = len(variant_names(cfg)), 0
        while n > 1:
            n, k = math.ceil(n / eta), k + 1
        rungs = sorted({max(1, round(budget / eta**i)) for i in range(k, 0, -1)} - {budget})
    return rungs if rungs and rungs[-1] == budget else [*rungs, budget]


def check_search(cfg: dict[str, Any]) -> None:
    """One-line errors for a search section that cannot work (the schema checks types and ranges)."""
    search = cfg.get("search") or {}
    budget = cfg["baseline"]["epochs"]
    rungs = search.get("rung_epochs") or []
    if any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise LcnnError(f"search.rung_epochs {rungs} must increase strictly: each rung trains further than the last")
    if rungs and rungs[-1] > budget:
        raise LcnnError(
            f"search.rung_epochs {rungs} goes past baseline.epochs ({budget}); every rung must be at most "
            "baseline.epochs (the survivors of the last rung then train to the full budget)"
        )
    if search_mode(cfg) != "halving":
        return
    if len(variant_names(cfg)) < 2:
        raise LcnnError("search.mode halving needs at least 2 variants to choose between; select more variants")
    if len(rung_schedule(cfg)) < 2:
        raise LcnnError(
            f"search.rung_epochs {rungs} stops no run before baseline.epochs ({budget}), so halving would "
            f"eliminate nothing; add an earlier rung, e.g. [{max(1, budget // search.get('eta', 3))}, {budget}]"
        )
    for name in variant_names(cfg):
        if "epochs" in all_variants(cfg)[name]:
            raise LcnnError(
                f"variant '{name}' sets its own epochs; halving gives every variant baseline.epochs, "
                "so remove it there or use search.mode grid"
            )
