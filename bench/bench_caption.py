"""Workloads a and b: captioning throughput and five questions about one image, ours against
transformers on the same random-weight model (ViT-B/14-sized encoder, base Q-Former,
OPT-125m-sized language model) and the same inputs.

    python bench/bench_caption.py                  # every environment in $BLIP2_BENCH_PYTHONS
    python bench/bench_caption.py --dtypes fp32 --quick
    python bench/bench_caption.py --worker ...     # one environment, one process (what the driver runs)

a. batch of 8 images, 20 new tokens (min_new_tokens = max_new_tokens, so every run does the
   same work), greedy and beam 5. Also times the image encoder alone and reports its share of
   the machine's measured matmul peak (bench/peak.py).
b. one image, five questions of different lengths, 10 new tokens each, greedy. The reference
   has no way to share the image between prompts: it runs five generate calls (or one call with
   the image repeated five times; the faster of the two is its figure). Ours passes the image once.

"ours" is plain `from_pretrained` and `generate`, as a user runs them (it prepacks its weights on
its own); "ours plain" (--plain) sets `auto_pack = False`. Wall clock, default threads; each
figure is the median of --repeats runs taken in turns after a warm-up, with the load average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUESTIONS = [[1864, 16, 5, 2335, 116], [2264, 3195, 16, 5, 1159, 2828, 116],
             [12375, 16, 11, 5, 2166, 9, 5, 2170, 116], [2264, 16, 37, 608, 116],
             [6179, 171, 82, 32, 89, 11, 5, 1345, 116]]  # token ids of five short questions
ANSWER = [33683, 35]  # " Answer:"


def vision_gflop(cfg, batch: int) -> float:
    """Multiply-adds x 2 of the image encoder on `batch` images (matmuls and attention)."""
    side = cfg.image_size // cfg.patch_size
    T, D, F = side * side + 1, cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * T * (4 * D * D + 2 * D * F) + 2 * 2 * T * T * D
    patch = 2 * (T - 1) * 3 * cfg.patch_size**2 * D
    return batch * (cfg.num_hidden_layers * per_layer + patch) / 1e9


def question_prompts(image_tokens: bool) -> list[list[int]]:
    return [common.prompt_ids(q + ANSWER, image_tokens=image_tokens) for q in QUESTIONS]


def run_worker(args) -> dict:
    torch.manual_seed(0)
    pixels8 = torch.randn(8, 3, 224, 224)
    transformers, version = common.reference()
    # transformers 5.x needs <image> tokens in the prompt; 4.37 puts the queries in front itself.
    ref_image_tokens = common.ref_major() >= 5
    results = {"reference": version, "threads": torch.get_num_threads(), "load": common.load_average(), "rows": []}
    ours_cfg = None
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        ours = common.load_ours(common.SMALL_DIR, dtype)
        plain = common.load_ours(common.SMALL_DIR, dtype) if args.plain else None
        if plain is not None:
            plain.auto_pack = False
        ours_cfg = ours.config.vision_config
        ref = common.load_reference(common.SMALL_DIR, dtype) if transformers and not args.no_ref else None
        px = pixels8.to(dtype)
        models = {"ours": ours, "ours plain": plain, "ref": ref}

        def row(workload, fn_by_impl, **extra):
            entry = {"workload": workload, "dtype": dname, "load": common.load_average(), **extra}
            timed = common.measure_many({k: f for k, f in fn_by_impl.items() if f is not None}, args.repeats)
            entry.update({impl: t["median"] for impl, t in timed.items()})
            results["rows"].append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
            return entry

        gen = dict(max_new_tokens=20, min_new_tokens=20)
        with torch.inference_mode():
            # The image encoder alone.
            if "vision" in args.workloads:
                row("vision", {k: (lambda m=m: m.vision_model(px)) for k, m in models.items() if m is not None},
                    gflop=vision_gflop(ours_cfg, 8))
            # a. captions for 8 images, greedy and beam 5; also whether the tokens agree.
            outputs = {}
            for beams in (1, 5) if "a" in args.workloads else ():
                fns = {}
                for impl, m in models.items():
                    if m is None:
                        continue
                    fns[impl] = (lambda m=m, b=beams, impl=impl: outputs.__setitem__((impl, b), m.generate(pixel_values=px, num_beams=b, **gen)))
                entry = row(f"a {'greedy' if beams == 1 else 'beam5'}", fns)
                if ref is not None:
                    ours_ids, ref_ids = outputs[("ours", beams)], outputs[("ref", beams)]
                    entry["same_tokens"] = float((ours_ids[:, -20:] == ref_ids[:, -20:]).float().mean())
            # b. five questions about one image.
            if "b" not in args.workloads:
                continue
            q_gen = dict(max_new_tokens=10, min_new_tokens=10)
            ids, mask = common.left_pad(question_prompts(image_tokens=True))
            one = px[:1]
            fns = {"ours": lambda: ours.generate(one, ids, mask, **q_gen)}
            if plain is not None:
                fns["ours plain"] = lambda: plain.generate(one, ids, mask, **q_gen)
            if ref is not None:
                prompts = question_prompts(image_tokens=ref_image_tokens)
                r_ids, r_mask = common.left_pad(prompts)
                loop = lambda: [ref.generate(pixel_values=one, input_ids=torch.tensor([p]), **q_gen) for p in prompts]
                batch = lambda: ref.generate(pixel_values=one.expand(5, -1, -1, -1), input_ids=r_ids,
                                             attention_mask=r_mask, **q_gen)
                fns["ref loop"], fns["ref batch"] = loop, batch
            entry = row("b five questions", fns)
            if ref is not None:
                entry["ref"] = min(entry["ref loop"], entry["ref batch"])
        del ours, plain, ref, models
    return results


def driver(args) -> None:
    peaks = common.peaks()
    envs = common.pythons() if not args.here else {"here": sys.executable}
    print(f"machine: {peaks['machine']['cpu']}, {peaks['machine']['threads']} threads; "
          f"peak fp32 {peaks['fp32_gflops']:.0f} GFLOP/s, bf16 {peaks['bf16_gflops']:.0f} GFLOP/s; load now {common.load_average():.2f}")
    worker_args = ["--dtypes", *args.dtypes, "--repeats", str(args.repeats), "--clock", args.clock,
                   "--workloads", *args.workloads] + \
        (["--plain"] if args.plain else [])
    all_results = {}
    for name, python in envs.items():
        print(f"running under {name} ({python}) ...", flush=True)
        all_results[name] = common.run_worker(python, Path(__file__), worker_args)
    if args.json:
        print(json.dumps({"peaks": peaks, "results": all_results}, indent=2))
    print_table(all_results, peaks)


def print_table(all_results: dict, peaks: dict) -> None:
    print()
    print(f"clock: {'CPU time, one thread' if all(r['threads'] == 1 for r in all_results.values()) else 'wall'}; "
          f"load during the runs: {', '.join(str(r['load']) for r in all_results.values())}")
    print("| workload | dtype | reference | ours s | reference s | ours speed-up | load average | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in all_results.items():
        for r in res["rows"]:
            note = ""
            if r["workload"] == "vision":
                peak = peaks["fp32_gflops"] if r["dtype"] == "fp32" else peaks["bf16_gflops"]
                peak *= res["threads"] / peaks["machine"]["threads"]  # one thread (--clock cpu): one core's share
                note = f"ours {r['gflop'] / r['ours']:.0f} GFLOP/s = {r['gflop'] / r['ours'] / peak:.0%} of peak; " \
                       f"ref {r['gflop'] / r['ref']:.0f} GFLOP/s = {r['gflop'] / r['ref'] / peak:.0%}" if "ref" in r else ""
            if "same_tokens" in r:
                note = f"tokens equal to the reference: {r['same_tokens']:.0%}"
            if "ref loop" in r:
                note = f"ref loop {r['ref loop']:.2f} s, batch of 5 copies {r['ref batch']:.2f} s"
            ref_s = r.get("ref")
            if "ours plain" in r:
                note += f"; ours unpacked (auto_pack = False) {r['ours plain']:.3f} s"
            print(f"| {r['workload']} | {r['dtype']} | {res['reference']} | {r['ours']:.3f} | "
                  f"{ref_s if ref_s is None else f'{ref_s:.3f}'} | {common.fmt_ratio(r['ours'], ref_s)} | {r.get('load', '?')} | {note} |")
    # bf16 against the reference's fp32, per environment.
    for name, res in all_results.items():
        by = {(r["workload"], r["dtype"]): r for r in res["rows"]}
        for w in ("a greedy", "a beam5"):
            if (w, "bf16") in by and (w, "fp32") in by and "ref" in by[(w, "fp32")]:
                print(f"ours bf16 vs {res['reference']} fp32, {w}: {common.fmt_ratio(by[(w, 'bf16')]['ours'], by[(w, 'fp32')]['ref'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="measure in this process and print JSON")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["vision", "a", "b"], choices=["vision", "a", "b"])
    parser.add_argument("--quick", action="store_true", help="one timed run each")
    parser.add_argument("--here", action="store_true", help="only this interpreter's transformers")
    parser.add_argument("--no-ref", action="store_true")
    parser.add_argument("--plain", action="store_true", help="also time ours with auto_pack = False")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: one thread, this process's CPU time (for a machine others are using)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    if not common.SMALL_DIR.is_dir():
        sys.exit(f"{common.SMALL_DIR} is missing: run python bench/make_full_checkpoint.py --small")
    if args.worker:
        common.set_clock(args.clock)
        print(json.dumps(run_worker(args)))
    else:
        driver(args)


if __name__ == "__main__":
    main()
