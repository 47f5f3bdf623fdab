"""Markdown tables from the committed benchmark results (bench/results/*.json).

    python bench/report.py                    # print the tables
    python bench/report.py --readme README.md # rewrite the README's benchmark block

The README's experiment block has its own generator, the one that writes its results:
`python experiments/tev_repro.py --only-plots --out experiments/results/cpu --readme README.md`.

Every table is preceded by the line that produced it: command, device, versions, commit and date, all
read from the result file's metadata. Nothing here measures anything. A result file that is not JSON or
lacks a field is named in a one-line error; the README is rewritten through a temporary file, so a
failure leaves it as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys


class ReportError(Exception):
    """A one-line error about a named file."""

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench-tables:begin -->", "<!-- bench-tables:end -->"


def provenance(meta: dict, path: pathlib.Path) -> str:
    versions = f"torch {meta['torch']}, Triton {meta.get('triton') or 'n/a'}, CUDA {meta.get('cuda') or 'n/a'}"
    where = meta["device"] + (f" ({meta['threads']} threads)" if meta.get("threads") else "")
    command = meta.get("command", "(command not recorded)")
    return (
        f"`{command}` on {where}; {versions}; commit `{meta['commit']}`, {meta['date']}. "
        f"Source: `{path.relative_to(ROOT).as_posix()}`."
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def tev_table(data: dict) -> str:
    header = ["V × d", "dtype", "tev GB/s", "one-liner GB/s", "speed-up", "E.sum() GB/s", "tev / sum"]
    rows = []
    for r in data["rows"]:
        rows.append([
            f"{r['shape'][0]:,} × {r['shape'][1]:,}", r["dtype"], f"{r['gbps']:.1f}", f"{r['one_liner_gbps']:.2f}",
            f"{r['speedup_vs_one_liner']:.1f}×", f"{r['sum_gbps']:.1f}" if r.get("sum_gbps") else "–",
            f"{100 * r['fraction_of_sum_read_rate']:.0f}%" if r.get("fraction_of_sum_read_rate") else "–",
        ])
    return table(header, rows)


def mlra_table(data: dict) -> str:
    header = ["model", "T", "g", "r", "dtype", "path", "ours fwd+bwd ms", "unfused MLRA ms", "MHA ms",
              "f+b vs unfused", "f+b vs MHA", "fwd vs MHA", "saved for bwd vs unfused"]
    rows = []
    for r in data["rows"]:
        rows.append([
            r["model"], str(r["T"]), str(r["g"]), str(r["r"]), r["dtype"], r.get("path", "–"),
            f"{r['ours_fwdbwd_ms']:.3f}", f"{r['unfused_fwdbwd_ms']:.3f}", f"{r['mha_fwdbwd_ms']:.3f}",
            f"{r['speedup_fwdbwd_vs_unfused']:.2f}×", f"{r['mha_fwdbwd_ms'] / r['ours_fwdbwd_ms']:.2f}×",
            f"{r['speedup_fwd_vs_mha']:.2f}×", f"{r['saved_ratio_vs_unfused']:.2f}×",
        ])
    return table(header, rows)


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}×" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}×"


def mlra_headline(data: dict) -> str:
    """The ratios the targets are stated in, by shape class: wide latents (g = 1) and narrow ones (attention
    on the latents: ``2·max(16, r) <= d_h``)."""
    rows = data["rows"]
    parts = []
    for label, pick in (("g = 1", lambda r: r["g"] == 1),
                        ("narrow latents", lambda r: 2 * max(16, r["r"]) <= r["d_h"])):
        sel = [r for r in rows if pick(r)]
        if not sel:
            continue
        parts.append(
            f"{label} ({len(sel)} rows): forward+backward {_span([r['speedup_fwdbwd_vs_unfused'] for r in sel])} "
            f"unfused MLRA and {_span([r['mha_fwdbwd_ms'] / r['ours_fwdbwd_ms'] for r in sel])} MHA, forward "
            f"{_span([r['speedup_fwd_vs_mha'] for r in sel])} MHA, saved for backward "
            f"{_span([r['saved_ratio_vs_unfused'] for r in sel])} unfused"
        )
    return "; ".join(parts) + "." if parts else ""


def decode_headline(data: dict) -> str:
    """MLRA's decode speed-up over MHA at 2,048 cached tokens and more, per variant, with its batch range."""
    steps = [r for r in data["rows"] if r["op"] == "decode_step" and r["S"] >= 2048 and r.get("speedup_vs_mha")]
    parts = []
    for v in dict.fromkeys(r["variant"] for r in steps):
        if v == "mha":
            continue
        sel = [r for r in steps if r["variant"] == v]
        worst = min(sel, key=lambda r: r["speedup_vs_mha"])
        parts.append(f"{v} {_span([r['speedup_vs_mha'] for r in sel])} (lowest at B = {worst['B']}, S = {worst['S']:,})")
    return ("At 2,048 cached tokens and more, step speed-up over MHA: " + "; ".join(parts) + ".") if parts else ""


def decode_table(data: dict) -> str:
    """One line per (B, S): the step time of each variant and MLRA's speed-up over MHA; then generate()."""
    steps = [r for r in data["rows"] if r["op"] == "decode_step"]
    variants = list(dict.fromkeys(r["variant"] for r in steps))
    by = {(r["B"], r["S"], r["variant"]): r for r in steps}
    header = ["B", "cached S"] + [f"{v} ms" for v in variants] + [f"{v} vs MHA" for v in variants if v != "mha"]
    header += ["MHA cache / MLRA cache", "best % of read bw"]
    rows = []
    for B, S in dict.fromkeys((r["B"], r["S"]) for r in steps):
        cells = [by.get((B, S, v)) for v in variants]
        line = [str(B), f"{S:,}"] + [f"{c['ms']:.3f}" if c else "–" for c in cells]
        line += [f"{c['speedup_vs_mha']:.2f}×" if c and c.get("speedup_vs_mha") else "–"
                 for c, v in zip(cells, variants) if v != "mha"]
        mha, mlra = by.get((B, S, "mha")), by.get((B, S, "mlra-g1"))
        line.append(f"{mha['cache_numbers_per_token'] / mlra['cache_numbers_per_token']:.0f}×" if mha and mlra else "–")
        line.append(f"{100 * max(c['fraction_of_read_bw'] for c in cells if c):.0f}%")
        rows.append(line)
    out = table(header, rows)
    gen = [r for r in data["rows"] if r["op"] == "generate"]
    if gen:
        def spread(r):  # rounds timed round by round (older files: one timing)
            if "tokens_per_s_p20" not in r:
                return "–"
            return f"{r['tokens_per_s_p20']:.1f}–{r['tokens_per_s_p80']:.1f} ({r['rounds']} rounds)"

        out += "\n\n" + table(
            ["generate()", "B", "prompt", "new tokens", "tokens/s (median)", "p20–p80"],
            [[r["variant"], str(r["B"]), str(r["prompt"]), str(r["new_tokens"]), f"{r['tokens_per_s']:.1f}", spread(r)]
             for r in gen],
        )
    return out


def pytest_benchmark_table(data: dict, path: pathlib.Path) -> str:
    """A pytest-benchmark JSON file: one table, rows grouped, each with its ratio to its group's fastest."""
    m, c = data["machine_info"], data["commit_info"]
    head = (
        f"`{m.get('command', 'pytest bench/test_bench_cpu.py --benchmark-only')}` on {m.get('device', m.get('cpu', {}).get('brand_raw'))} "
        f"({m.get('torch_threads')} threads); torch {m.get('torch')}, Triton {m.get('triton')}; "
        f"commit `{c['id'][:12]}{'-dirty' if c.get('dirty') else ''}`, {data['datetime'][:19]}Z. "
        f"Source: `{path.relative_to(ROOT).as_posix()}`."
    )
    rows, groups = [], {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    for group, items in groups.items():
        best = min(b["stats"]["median"] for b in items)
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            impl = b["name"].split("[", 1)[1].rstrip("]") if "[" in b["name"] else b["name"]
            rows.append([group, impl, f"{1e3 * b['stats']['median']:.2f}", f"{b['stats']['median'] / best:.2f}×"])
    return head + "\n\n" + table(["case", "implementation", "median ms", "vs fastest"], rows)


def render(results: pathlib.Path = RESULTS) -> str:
    parts = []
    # The training benchmark first, then decoding, then the rest: the README leads with the MLRA ratios.
    order = {"mlra": 0, "decode": 1}
    for path in sorted(results.glob("*.json"), key=lambda p: (order.get(p.name.split("_")[0], 2), p.name)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ReportError(f"{path}: cannot read it as JSON ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            if "benchmarks" in data and "machine_info" in data:
                parts.append(f"**CPU, pytest-benchmark.** {pytest_benchmark_table(data, path)}")
                continue
            if not data.get("rows"):
                continue
            if path.name.startswith("tev_"):
                title, body = f"TEV reduction, {data['meta']['device_type'].upper()}", tev_table(data)
            elif path.name.startswith("decode_"):
                dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in data["rows"] if r["op"] == "decode_step"))
                title = f"Decode step on the KV cache, {data['meta']['device_type'].upper()}, {dtypes}"
                body = decode_table(data)
                headline = decode_headline(data)
                body = f"{headline}\n\n{body}" if headline else body
            elif path.name.startswith("mlra_"):
                smoke = "smoke" in path.name
                title = "MLRA attention, training and prefill" + (" (smoke shapes, not a speed result)" if smoke else "")
                body = mlra_table(data)
                headline = "" if smoke else mlra_headline(data)
                body = f"{headline}\n\n{body}" if headline else body
            else:
                continue
            parts.append(f"**{title}.** {provenance(data['meta'], path)}\n\n{body}")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            what = f"no field {err.args[0]!r}" if isinstance(err, KeyError) else f"a malformed field ({err})"
            raise ReportError(f"{path}: {what}; is it a result file of bench/bench_*.py?") from None
    if not parts:
        return "_No benchmark results are committed yet._"
    return "\n\n".join(parts)


def _replace_block(doc: str, begin: str, end: str, text: str, name: str) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ReportError(f"{name}: no '{begin}' ... '{end}' block to rewrite")
    return pattern.sub(lambda _: f"{begin}\n{text}\n{end}", doc)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def run(args: argparse.Namespace) -> None:
    text = render()
    if args.readme is None:
        print(text)
        return
    readme = args.readme
    if not readme.exists():
        raise ReportError(f"--readme {readme}: no such file")
    if not readme.is_file():
        raise ReportError(f"--readme {readme}: not a regular file")
    try:
        doc = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"--readme {readme}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    doc = _replace_block(doc, BEGIN, END, text, str(readme))
    try:
        _write_atomic(readme, doc)
    except OSError as err:
        raise ReportError(f"--readme {readme}: cannot write it ({err.strerror or err}); it was left as it was") from None
    print(f"rewrote the benchmark block of {readme}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=pathlib.Path, help="file whose bench block to rewrite in place")
    args = p.parse_args(argv)
    try:
        run(args)
    except ReportError as err:
        print(f"report.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
