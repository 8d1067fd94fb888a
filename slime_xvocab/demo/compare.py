"""Run every arm x seed of the default scenario (in parallel processes), aggregate, report.

Headline: the fraction of the ceiling's improvement each arm recovers, per seed ``(M_arm - M0) / (M_ceiling - M0)``
for held-out greedy accuracy and ``(M0 - M_arm) / (M0 - M_ceiling)`` for the teacher-scored reverse KL per byte,
then the mean and a 95 % t-interval over the paired seeds.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from slime_xvocab.demo.arms import ARM_LABELS, HOOK_ARMS

# two-sided 95 % Student-t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(xs) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval); half-width nan for a single value."""
    xs = np.asarray([x for x in xs if math.isfinite(x)], dtype=float)
    if len(xs) == 0:
        return math.nan, math.nan
    if len(xs) == 1:
        return float(xs[0]), math.nan
    return float(xs.mean()), float(_T95.get(len(xs) - 1, 1.96) * xs.std(ddof=1) / math.sqrt(len(xs)))


# --------------------------------------------------------------------------------------------- workers
_W: dict = {}


def _quiet_transformers() -> None:
    """No per-model "Loading weights" bars and deprecation chatter in logs; progress comes from the demo."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _init_worker(cfg, teacher_dir: str, student_dir: str, teacher_url: str | None, threads: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    _quiet_transformers()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    from slime_xvocab.demo.exact import ExactTeacher
    from slime_xvocab.demo.models import ChatLM
    from slime_xvocab.demo.task import all_problems, split_problems

    teacher, student = ChatLM.load(Path(teacher_dir)), ChatLM.load(Path(student_dir))
    train, held_out = split_problems(all_problems(cfg.lo, cfg.hi), cfg.n_eval, cfg.seed)
    _W.update(cfg=cfg, teacher=teacher, student=student, exact=ExactTeacher(teacher, student), train=train,
              held_out=held_out, teacher_dir=teacher_dir, student_dir=student_dir, url=teacher_url)


def _log(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()


def _run_job(arm: str, seed: int) -> dict:
    from slime_xvocab.demo.arms import ArmRun, hook_args, run_arm

    w = _W
    args = hook_args(arm, w["url"], w["student_dir"], w["teacher_dir"], w["cfg"], w["teacher"].template_kwargs)
    run = ArmRun(w["cfg"], w["student"], w["teacher"], w["exact"], w["train"], w["held_out"], args)
    return run_arm(arm, seed, run, log=_log)


# ------------------------------------------------------------------------------------------- aggregate
def aggregate(runs: list[dict]) -> dict:
    """Per arm: start/end metrics, deltas and recovered fractions (mean, 95 % half-width over seeds)."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    out: dict = {}
    for arm in arms:
        rows = {"acc_end": [], "kl_end": [], "d_acc": [], "d_kl": [], "rec_acc": [], "rec_kl": [], "cover": [],
                "seconds": [], "acc_start": [], "kl_start": []}
        for s in seeds:
            r, c = by.get((arm, s)), by.get(("ceiling", s))
            if r is None:
                continue
            h0, h1 = r["history"][0], r["history"][-1]
            rows["acc_start"].append(h0["accuracy"])
            rows["kl_start"].append(h0["reverse_kl_per_byte"])
            rows["acc_end"].append(h1["accuracy"])
            rows["kl_end"].append(h1["reverse_kl_per_byte"])
            rows["d_acc"].append(h1["accuracy"] - h0["accuracy"])
            rows["d_kl"].append(h1["reverse_kl_per_byte"] - h0["reverse_kl_per_byte"])
            rows["cover"].append(r["coverage"])
            rows["seconds"].append(r["seconds"])
            if c is not None:
                ca = c["history"][-1]["accuracy"] - c["history"][0]["accuracy"]
                ck = c["history"][0]["reverse_kl_per_byte"] - c["history"][-1]["reverse_kl_per_byte"]
                rows["rec_acc"].append((h1["accuracy"] - h0["accuracy"]) / ca if ca else math.nan)
                rows["rec_kl"].append((h0["reverse_kl_per_byte"] - h1["reverse_kl_per_byte"]) / ck if ck else math.nan)
        out[arm] = {k: interval(v) for k, v in rows.items()}
        out[arm]["per_seed"] = rows
        out[arm]["n_seeds"] = len(rows["d_acc"])
    return out


def _pm(m: float, h: float, fmt: str) -> str:
    if not math.isfinite(m):
        return "n/a"
    return fmt.format(m) + ("" if not math.isfinite(h) else " ± " + fmt.format(h).lstrip("+"))


def table_lines(summary: dict) -> list[str]:
    """The recovery table as plain text lines, at most 100 characters wide."""
    head = (f"{'arm':<10} {'cover':>5} {'acc end':>7} {'Δ acc (points)':>15} {'recovered':>12} "
            f"{'rKL/byte end':>12} {'Δ rKL/byte':>15} {'recovered':>12}")
    lines = [head, "-" * len(head)]
    for arm, a in summary.items():
        lines.append(
            f"{arm:<10} {a['cover'][0]:>5.0%} {a['acc_end'][0]:>7.1%} "
            f"{_pm(100 * a['d_acc'][0], 100 * a['d_acc'][1], '{:+.1f}'):>15} "
            f"{_pm(*a['rec_acc'], '{:.2f}'):>12} {a['kl_end'][0]:>12.3f} "
            f"{_pm(*a['d_kl'], '{:+.3f}'):>15} {_pm(*a['rec_kl'], '{:.2f}'):>12}")
    return lines


def paired_lines(runs: list[dict], ref: str = "oracle_tok") -> list[str]:
    """Per arm, the paired end-of-run difference to ``ref`` (same seed): accuracy points and reverse KL per byte."""
    by = {(r["arm"], r["seed"]): r["history"][-1] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    arms = [a for a in dict.fromkeys(r["arm"] for r in runs) if a != ref]
    if not any((ref, s) in by for s in seeds):
        return []
    head = f"{'arm':<10} {'acc - ' + ref + ' (points)':>26} {'rKL/byte - ' + ref:>26}"
    lines = [head, "-" * len(head)]
    for arm in arms:
        da = [100 * (by[(arm, s)]["accuracy"] - by[(ref, s)]["accuracy"]) for s in seeds if (arm, s) in by]
        dk = [by[(arm, s)]["reverse_kl_per_byte"] - by[(ref, s)]["reverse_kl_per_byte"] for s in seeds
              if (arm, s) in by]
        lines.append(f"{arm:<10} {_pm(*interval(da), '{:+.1f}'):>26} {_pm(*interval(dk), '{:+.3f}'):>26}")
    return lines


def report_lines(results: dict) -> list[str]:
    """Everything printed after the runs: the recovery table and the paired differences to ``oracle_tok``."""
    arms, summary = results["arms"], results["summary"]
    lines = [f"Recovery of the ceiling's improvement: {results['direction']}, {len(results['seeds'])} paired seeds",
             f"mean ± 95 % interval; start: held-out accuracy {summary[arms[0]]['acc_start'][0]:.1%}, reverse KL "
             f"{summary[arms[0]]['kl_start'][0]:.3f} nats/byte",
             "recovered = the arm's change / the ceiling's change; cover = share of tokens with a teacher value"]
    lines += table_lines(summary)
    if "dense" in summary and "ceiling" in summary:
        d = summary["dense"]
        lines += ["", "Headline (the dense loss; bar: 0.8 on both): the plugin's dense targets recover",
                  f"  {_pm(*d['rec_acc'], '{:.2f}')} of the ceiling's accuracy gain and "
                  f"{_pm(*d['rec_kl'], '{:.2f}')} of its reverse-KL gain"]
    extra = paired_lines(results["runs"])
    if extra:
        lines += ["", "Paired difference at the end to oracle_tok (slime's sampled-token loss with exact values):"]
        lines += extra
    return lines


def plot(results: dict, out: Path) -> Path:
    """curves.png: accuracy and reverse KL per byte against steps, mean over seeds with a 95 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (key, title) in zip(axes, [("accuracy", "held-out greedy accuracy"),
                                       ("reverse_kl_per_byte", "reverse KL / byte (exact teacher)")]):
        for arm in results["arms"]:
            runs = [r for r in results["runs"] if r["arm"] == arm]
            if not runs:
                continue
            steps = [h["step"] for h in runs[0]["history"]]
            vals = np.array([[h[key] for h in r["history"]] for r in runs])
            stats = [interval(vals[:, i]) for i in range(vals.shape[1])]
            mean = np.array([m for m, _ in stats])
            half = np.nan_to_num(np.array([h for _, h in stats]))
            (line,) = ax.plot(steps, mean, marker="o", ms=3, label=arm)
            ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.15)
        if key == "accuracy" and "teacher_accuracy" in results:
            ax.axhline(results["teacher_accuracy"], ls="--", c="gray", lw=1, label="teacher")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    n = len({r["seed"] for r in results["runs"]})
    fig.suptitle(f"slime-xvocab CPU demo ({results['direction']}): mean of {n} paired seeds, 95 % band", fontsize=11)
    fig.tight_layout()
    path = Path(out) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- main
def run_comparison(cfg, arms: list[str], seeds: list[int], jobs: int, out: Path, log, scenario: str) -> int:
    """Prepare (or load) teacher and student, run every (arm, seed), write metrics.json + curves.png, print."""
    import torch

    from slime_xvocab.assets import cache_dir
    from slime_xvocab.demo.models import greedy_accuracy
    from slime_xvocab.demo.opd import prepare_model
    from slime_xvocab.demo.task import all_problems, split_problems
    from slime_xvocab.teacher_server import start_teacher_server

    t_start = time.time()
    _quiet_transformers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    direction = f"{cfg.student_family} student <- {cfg.teacher_family} teacher"
    timings: dict[str, float] = {}
    import torch as _t
    import transformers

    results: dict = {"scenario": scenario, "direction": direction, "config": asdict(cfg), "arms": arms,
                     "seeds": seeds, "timings": timings, "arm_labels": {a: ARM_LABELS[a] for a in arms},
                     "versions": {"torch": _t.__version__, "transformers": transformers.__version__,
                                  "python": sys.version.split()[0]}}
    models = {}
    for which, steps in (("teacher", cfg.teacher_steps), ("student", cfg.student_steps)):
        t0 = time.time()
        every = max(1, steps // 10)

        def on_step(step: int, loss: float, which=which, steps=steps, every=every, t0=t0) -> None:
            if (step + 1) % every == 0 or step + 1 == steps:
                log(f"SFT {which}: step {step + 1}/{steps}, loss {loss:.3f} ({time.time() - t0:.0f}s)")

        lm, model_dir, cached = prepare_model(cfg, which, cache_dir() / "demo", log, on_step)
        log(f"{which}: {'cached' if cached else 'trained'} {model_dir} ({time.time() - t0:.0f}s)")
        timings[f"{which}_sft_s"] = time.time() - t0
        models[which] = (lm, model_dir)
    teacher, teacher_dir = models["teacher"]
    student, student_dir = models["student"]
    _, held_out = split_problems(all_problems(cfg.lo, cfg.hi), cfg.n_eval, cfg.seed)
    held_prompts = [teacher.prompt_ids(p.messages()) for p in held_out]
    results["teacher_accuracy"] = greedy_accuracy(teacher, held_prompts, [p.answer for p in held_out],
                                                  cfg.max_new_tokens)
    sampled, _, _ = teacher.sample(held_prompts, cfg.max_new_tokens, temperature=1.0,
                                   generator=torch.Generator().manual_seed(cfg.seed))
    results["teacher_sampled_accuracy"] = sum(
        teacher.decode_response(r).strip() == p.answer for r, p in zip(sampled, held_out)) / len(held_out)
    results["student_vocab"], results["teacher_vocab"] = student.vocab.size, teacher.vocab.size
    log(f"{direction}: teacher held-out accuracy {results['teacher_accuracy']:.1%} greedy, "
        f"{results['teacher_sampled_accuracy']:.1%} at temperature 1; {len(held_out)} held-out problems; "
        f"{len(arms)} arms x {len(seeds)} seeds x {cfg.opd_steps} steps x {cfg.opd_batch} samples, {jobs} jobs")

    jobs_list = [(arm, seed) for seed in seeds for arm in arms]
    runs: list[dict] = []
    need_server = any(a in HOOK_ARMS for a in arms)
    t0 = time.time()
    # float64: the server's answers do not depend on which samples it scored together (reproducible runs)
    server = start_teacher_server(teacher_dir, port=0, num_threads=1, extra_args=["--dtype", "float64"]) \
        if need_server else None
    handle = server.__enter__() if server is not None else None
    try:
        url = handle.url if handle is not None else None
        if handle is not None:
            timings["teacher_server_start_s"] = time.time() - t0
            log(f"teacher server: {url} ({timings['teacher_server_start_s']:.1f}s to start)")
        init = (cfg, str(teacher_dir), str(student_dir), url, 1 if jobs > 1 else torch.get_num_threads())
        t_runs = time.time()

        def done(r: dict) -> None:
            runs.append(r)
            # a partial metrics.json after every run: an interrupted long run keeps what it measured
            (out / "metrics.json").write_text(json.dumps({**results, "runs": runs, "partial": True}, default=str))
            h0, h1 = r["history"][0], r["history"][-1]
            log(f"[{len(runs)}/{len(jobs_list)}] {r['arm']} seed {r['seed']}: acc {h0['accuracy']:.1%} -> "
                f"{h1['accuracy']:.1%}, rKL/byte {h0['reverse_kl_per_byte']:.3f} -> "
                f"{h1['reverse_kl_per_byte']:.3f}, cover {r['coverage']:.0%} ({r['seconds']:.0f}s; "
                f"{time.time() - t_runs:.0f}s elapsed)")

        if jobs <= 1:
            _init_worker(*init)
            for arm, seed in jobs_list:
                done(_run_job(arm, seed))
        else:
            with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                        initargs=init) as pool:
                futs = [pool.submit(_run_job, arm, seed) for arm, seed in jobs_list]
                for f in cf.as_completed(futs):
                    done(f.result())
        timings["runs_s"] = time.time() - t_runs
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    runs.sort(key=lambda r: (r["seed"], arms.index(r["arm"])))
    results["runs"] = runs
    results["summary"] = aggregate(runs)
    results["table"] = table_lines(results["summary"])
    timings["total_s"] = time.time() - t_start
    log("")
    for line in report_lines(results):
        log(line)
    (out / "metrics.json").write_text(json.dumps(results, indent=1, default=str))
    ppath = plot(results, out)
    log(f"wrote {out / 'metrics.json'} and {ppath}; total {timings['total_s']:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m slime_xvocab.demo.compare OUT/metrics.json``: print the report again (and redraw the plot)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m slime_xvocab.demo.compare", description=main.__doc__)
    p.add_argument("metrics", type=Path)
    a = p.parse_args(argv)
    results = json.loads(a.metrics.read_text())
    results["summary"] = aggregate(results["runs"])
    results["table"] = table_lines(results["summary"])
    for line in report_lines(results):
        print(line)
    plot(results, a.metrics.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
