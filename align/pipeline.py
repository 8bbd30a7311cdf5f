"""The one-command pipeline: base model → SFT → RM → PPO (and/or GRPO, ...), then a report.

    align pipeline --config recipes/tiny/pipeline.yaml

Each stage is the ordinary stage run from its own recipe (the same file works with `align <stage> --config`),
with the pipeline linking the stages: every stage reads the previous stage's output directory. Swapping PPO for
GRPO is one line: `rl_stages: [grpo]`.

At the end the report (printed, and saved as report.md + report.json in output_dir) gives the greedy gold
accuracy on held-out prompts of the starting model, after SFT and after each RL stage, the reward model's
held-out pairwise accuracy, the wall time of each stage and in total, and the final KL to the reference;
curves.png plots reward (proxy and gold), KL and accuracy over the steps of each RL stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from .config import AlignError, Checked, _f, build_config, read_yaml
from .stages import RL_STAGES, config_class, runner


@dataclass
class PipelineConfig(Checked):
    """Run SFT → RM → RL stages from their recipes, evaluate each model, and write a report."""

    output_dir: str = _f("runs/tiny", "Root directory: one sub-directory per stage, plus report.md/json and "
                                      "curves.png.")
    overwrite_output_dir: bool = _f(False, "Replace earlier results in output_dir (else a used output_dir is "
                                           "an error).")
    base_model: str = _f("", "Starting model (hub id or path); empty builds the built-in tiny model offline "
                             "into output_dir/base.")
    sft: str = _f("recipes/tiny/sft.yaml", "SFT recipe (model and output_dir are set by the pipeline).")
    rm: str = _f("recipes/tiny/rm.yaml", "Reward-model recipe (trained from the SFT model); empty skips it.")
    rl_stages: list = _f(["ppo", "grpo"], "RL stages to run from the SFT model, each from its recipe: any of "
                                          "ppo, grpo, trpo, reinforce, dpo, online_dpo.", choices=RL_STAGES)
    ppo: str = _f("recipes/tiny/ppo.yaml", "PPO recipe (its reward_model is set to the RM trained here).")
    grpo: str = _f("recipes/tiny/grpo.yaml", "GRPO recipe.")
    trpo: str = _f("recipes/tiny/trpo.yaml", "TRPO recipe.")
    reinforce: str = _f("recipes/tiny/reinforce.yaml", "REINFORCE recipe.")
    dpo: str = _f("recipes/tiny/dpo.yaml", "DPO recipe (trained on its recipe's comparisons from the SFT model).")
    online_dpo: str = _f("recipes/tiny/online_dpo.yaml", "Online DPO recipe.")
    eval_data: str = _f("data/addition/eval.jsonl", "Held-out prompts with the columns the gold functions need.")
    eval_reward_funcs: list = _f(["exact_match"], "Gold reward functions; reward_mean of these is the accuracy.")
    eval_max_new_tokens: int = _f(8, "Generation length for the gold evaluation.", ge=1)
    eval_max_samples: int = _f(0, "Evaluate on the first N held-out prompts only (0: all).", ge=0)
    overrides: dict = _f({}, "Per-stage field overrides, e.g. {sft: {max_steps: 3}, ppo: {max_steps: 2}}.")
    plot: bool = _f(True, "Write curves.png (needs matplotlib).")
    num_threads: int = _f(0, "CPU threads for torch in every stage and evaluation (0: torch's default; the "
                             "tiny model runs fastest on 1).", ge=0)


def stage_config(stage: str, recipe: str, links: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The stage's config: its recipe file, then the pipeline's links, then the user's overrides."""
    values = read_yaml(recipe) if recipe else {}
    cls = config_class(stage)
    build_config(cls, values, recipe)  # the recipe's own errors name the recipe
    values.update(links)
    values.update(overrides or {})
    return build_config(cls, values, f"{recipe} (in the pipeline)")


def gold_accuracy(model_dir: str, cfg: PipelineConfig) -> dict[str, Any]:
    from .evaluate import EvalConfig, run_eval

    res = run_eval(EvalConfig(model=model_dir, data=cfg.eval_data, reward_funcs=list(cfg.eval_reward_funcs),
                              max_new_tokens=cfg.eval_max_new_tokens, max_samples=cfg.eval_max_samples,
                              batch_size=256))
    return {"accuracy": res["reward_mean"], "eval_seconds": res["seconds"], "num_samples": res["num_samples"]}


def read_metrics(out_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(x) for x in fh if x.strip()]


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    root = cfg.output_dir
    if cfg.num_threads > 0:
        import torch

        torch.set_num_threads(cfg.num_threads)
    unknown = set(cfg.overrides) - {"sft", "rm", *RL_STAGES}
    if unknown:
        raise AlignError(f"overrides: unknown stage '{sorted(unknown)[0]}'")
    if not os.path.isfile(cfg.eval_data):
        raise AlignError(f"{cfg.eval_data}: eval_data file not found")
    if os.path.isdir(root) and os.listdir(root):
        if not cfg.overwrite_output_dir:
            raise AlignError(f"{root}: output_dir is not empty (set overwrite_output_dir)")
    dirs = {s: os.path.join(root, s) for s in ("base", "sft", "rm", *cfg.rl_stages)}
    # Build every stage's config first, so a bad recipe fails before anything runs or is written.
    configs: dict[str, Any] = {}
    base = cfg.base_model or dirs["base"]
    configs["sft"] = stage_config("sft", cfg.sft, {"model": base, "output_dir": dirs["sft"],
                                                   "overwrite_output_dir": True}, cfg.overrides.get("sft"))
    if cfg.rm:
        configs["rm"] = stage_config("rm", cfg.rm, {"model": dirs["sft"], "output_dir": dirs["rm"],
                                                    "overwrite_output_dir": True}, cfg.overrides.get("rm"))
    defaults = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}
    for s in cfg.rl_stages:
        recipe = getattr(cfg, s)
        if recipe == defaults[s] and os.path.dirname(cfg.sft) != os.path.dirname(recipe):
            # a stage added to rl_stages without its recipe would train the built-in task's recipe on this model
            raise AlignError(f"rl_stages has {s} but no {s} recipe is set: the default {recipe} is for the "
                             f"built-in tiny task, not the recipes of sft ({cfg.sft}); set {s}: to a recipe")
        probe = read_yaml(recipe)
        links = {"model": dirs["sft"], "output_dir": dirs[s], "overwrite_output_dir": True}
        if probe.get("reward_model"):
            if not cfg.rm:
                raise AlignError(f"{recipe}: uses a reward_model but the pipeline trains none (rm is empty)")
            links["reward_model"] = dirs["rm"]
            if probe.get("value_model") not in (None, "", "policy"):
                links["value_model"] = dirs["rm"]
        configs[s] = stage_config(s, recipe, links, cfg.overrides.get(s))

    if os.path.isdir(root) and cfg.overwrite_output_dir:
        for d in dirs.values():
            if d != cfg.base_model and os.path.isdir(d):
                shutil.rmtree(d)
        for f in ("report.md", "report.json", "curves.png"):
            if os.path.exists(os.path.join(root, f)):
                os.remove(os.path.join(root, f))
    os.makedirs(root, exist_ok=True)

    t_all = time.perf_counter()
    report: dict[str, Any] = {"stages": {}, "output_dir": root}
    if not cfg.base_model:
        from .tiny import DEFAULT_TINY, save_tiny_model

        t0 = time.perf_counter()
        save_tiny_model(dirs["base"], **DEFAULT_TINY)
        report["stages"]["base"] = {"seconds": time.perf_counter() - t0, "model": dirs["base"]}
    else:
        report["stages"]["base"] = {"seconds": 0.0, "model": base}
    report["stages"]["base"].update(gold_accuracy(base, cfg))

    for stage in ["sft", *(["rm"] if cfg.rm else []), *cfg.rl_stages]:
        print(f"\n=== {stage} ===", flush=True)
        t0 = time.perf_counter()
        last = runner(stage)(configs[stage]) or {}
        entry: dict[str, Any] = {"seconds": time.perf_counter() - t0, "model": dirs[stage]}
        if stage == "rm":
            entry["pairwise_accuracy"] = last.get("eval_accuracy")
            entry["train_accuracy"] = last.get("accuracy")
        else:
            entry.update(gold_accuracy(dirs[stage], cfg))
        if stage in RL_STAGES:
            rows = read_metrics(dirs[stage])
            kls = [r["kl"] for r in rows if isinstance(r.get("kl"), (int, float))]
            entry["final_kl"] = kls[-1] if kls else None
            entry["steps"] = rows[-1]["step"] if rows else 0
        report["stages"][stage] = entry
    report["total_seconds"] = time.perf_counter() - t_all
    sft_acc = report["stages"]["sft"]["accuracy"]
    for s in cfg.rl_stages:
        report["stages"][s]["gain_over_sft"] = report["stages"][s]["accuracy"] - sft_acc
    if cfg.plot:
        report["plot"] = plot_curves({s: dirs[s] for s in cfg.rl_stages}, os.path.join(root, "curves.png"),
                                     start_accuracy=sft_acc)
    md = render_report(report)
    with open(os.path.join(root, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(root, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(md)
    print("\n" + md, flush=True)
    return {"report": os.path.join(root, "report.md"), "total_seconds": round(report["total_seconds"], 1)}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_report(report: dict[str, Any]) -> str:
    lines = ["# align pipeline report", "",
             "| stage | gold accuracy (greedy, held out) | RM pairwise accuracy (held out) | final KL to ref "
             "| steps | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for name, e in report["stages"].items():
        lines.append(f"| {name} | {_fmt(e.get('accuracy'), True)} | {_fmt(e.get('pairwise_accuracy'), True)} | "
                     f"{_fmt(e.get('final_kl'))} | {_fmt(e.get('steps'))} | {e['seconds']:.1f} |")
    lines.append(f"| **total** | | | | | **{report['total_seconds']:.1f}** |")
    gains = [(n, e["gain_over_sft"]) for n, e in report["stages"].items() if "gain_over_sft" in e]
    if gains:
        lines += ["", "Gain over SFT: " + ", ".join(f"{n} {100 * g:+.1f} points" for n, g in gains) + "."]
    if report.get("plot"):
        lines += ["", f"Curves: {report['plot']}"]
    lines.append("")
    return "\n".join(lines)


# eval metrics of offline DPO that are not accuracies (its eval_rewards_accuracies is one)
_NOT_ACCURACY = ("eval_loss", "eval_logps_", "eval_nll_", "eval_rewards_chosen", "eval_rewards_rejected",
                 "eval_rewards_margins")


def plot_curves(stage_dirs: dict[str, str], path: str, start_accuracy: float | None = None) -> str | None:
    """Reward (proxy and gold), KL and held-out accuracy over steps, one row per RL stage; ``start_accuracy``
    (the SFT model's, where the RL stages start) is drawn as a dotted line on the accuracy plots."""
    if not stage_dirs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png")
        return None
    fig, axes = plt.subplots(len(stage_dirs), 3, figsize=(13, 3.2 * len(stage_dirs)), squeeze=False)
    for row, (stage, d) in enumerate(stage_dirs.items()):
        rows = read_metrics(d)
        steps = [r["step"] for r in rows]
        ax = axes[row]
        # offline DPO samples nothing: its panel shows the implicit rewards of the chosen and rejected answers
        proxy = [("reward", "proxy reward")] if any("reward" in r for r in rows) else \
            [("rewards_chosen", "implicit reward, chosen"), ("rewards_rejected", "implicit reward, rejected")]
        for key, label in proxy + [(k, k.replace("gold_", "gold ")) for k in
                                   sorted({k for r in rows for k in r if k.startswith("gold_")})]:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax[0].plot(*zip(*pts), label=label)
        ax[0].set_title(f"{stage}: reward")
        ax[0].legend(fontsize=8)
        pts = [(r["step"], r["kl"]) for r in rows if isinstance(r.get("kl"), (int, float))]
        if pts:
            ax[1].plot(*zip(*pts), color="tab:red")
        ax[1].set_title(f"{stage}: KL to reference")
        acc_keys = sorted({k for r in rows for k in r if k.startswith("eval_") and k != "eval_reward"
                           and not k.startswith(_NOT_ACCURACY)})
        for key in acc_keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax[2].plot(*zip(*pts), marker="o", label=key)
        pairwise = acc_keys == ["eval_rewards_accuracies"]  # offline DPO: held-out pairs, not greedy answers
        if start_accuracy is not None and not pairwise:
            ax[2].axhline(start_accuracy, ls=":", color="gray", label=f"start (SFT): {start_accuracy:.1%}")
        ax[2].set_title(f"{stage}: held-out " + ("pairwise accuracy (implicit reward)" if pairwise
                                                 else "accuracy (greedy)"))
        if acc_keys or start_accuracy is not None:
            ax[2].legend(fontsize=8)
        for a in ax:
            a.set_xlabel("step")
            if steps:
                a.set_xlim(0, max(steps))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
