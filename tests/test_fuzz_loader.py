"""Fuzzing the loader: a tiny model's header and preambles, mutated at random (fixed seed), must either
load and run with finite logits or raise a FlashMoEError subclass; never crash the process, never
escape as another exception, and never load a file whose preamble was changed. The cases run in child
processes, so that a crash is caught and attributed to its case."""

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from flashmoe.format import PREAMBLE
from flashmoe.synth import DEMO_CONFIG, write_random_model

TINY = {**DEMO_CONFIG, "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "eos_token_id": 2}
N_CASES = 1000
TIMEOUT = 300  # seconds for one child; the whole run takes a few

# Reads "index path" lines; for each case prints {"start": i} before and {"done": i, ...} after, so that a
# child that dies mid-case names that case. verify_checksums covers the dense.bin and expert CRC paths.
CHILD = r"""
import json, sys
import numpy as np
import flashmoe
from flashmoe.errors import FlashMoEError
for line in sys.stdin:
    i, path = line.rstrip("\n").split(" ", 1)
    print(json.dumps({"start": int(i)}), flush=True)
    out = {"done": int(i), "error": None}
    try:
        out["finite"] = bool(np.isfinite(flashmoe.load(path, verify_checksums=True).forward([1, 2, 3])).all())
    except Exception as exc:
        out.update(error=type(exc).__name__, flashmoe=isinstance(exc, FlashMoEError), message=str(exc)[:300])
    print(json.dumps(out), flush=True)
"""

KEYS = ("offset", "nbytes", "scales_offset", "biases_offset", "group_size", "shape", "dtype", "checksum",
        "size", "file", "layer", "num_experts", "intermediate_size", "eos_token_id", "max_position_embeddings",
        "mlp_only_layers", "rope_type", "fuzz")


def _random_value(rng, old):
    """Another value for a header leaf: wrong type, edge number, nearby number, huge, NaN, string, container."""
    near = old if isinstance(old, int) and not isinstance(old, bool) else 64
    choices = [
        lambda: int(rng.integers(-2, 70000)), lambda: near + 64 * int(rng.integers(-4, 5)), lambda: -1, lambda: 0,
        lambda: 1, lambda: 2**31, lambda: 2**32 + near, lambda: 2**63, lambda: 2**64 - 64, lambda: 2**70,
        lambda: float(near), lambda: float(rng.uniform(-2, 2)), lambda: float("nan"), lambda: float("inf"),
        lambda: -float("inf"), lambda: 1e300, lambda: 1e-300, lambda: "x", lambda: str(old), lambda: None,
        lambda: True, lambda: False, lambda: [], lambda: {}, lambda: [old, old], lambda: {"a": old},
    ]
    return choices[int(rng.integers(len(choices)))]()


def _nodes(node, path=()):
    """(path, node) of every value in a JSON tree."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _nodes(v, path + (k,))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _mutate_header(rng, h):
    """One random change to the header tree, in place; returns a description."""
    nodes = list(_nodes(h))
    kind = str(rng.choice(["leaf", "leaf", "tensor", "config", "delete", "add", "duplicate", "swap"]))
    if kind in ("tensor", "config"):  # a field the engine reads, more often than a uniform pick would
        if kind == "tensor":
            section = str(rng.choice(["dense", "experts"]))
            tensors = h.get(section, {}).get("tensors") if isinstance(h.get(section), dict) else None
            if not isinstance(tensors, dict) or not tensors:
                return "tensor: none left"
            parent = tensors[str(rng.choice(sorted(tensors)))]
        else:
            parent = h.get("config")
        if not isinstance(parent, dict) or not parent:
            return f"{kind}: not an object"
        key = str(rng.choice(sorted(parent)))
        parent[key] = value = _random_value(rng, parent[key])
        return f"{kind} {key} = {value!r}"
    if kind == "leaf":
        leaves = [(p, v) for p, v in nodes if p and not isinstance(v, (dict, list))]
        path, old = leaves[int(rng.integers(len(leaves)))]
        _get(h, path[:-1])[path[-1]] = value = _random_value(rng, old)
        return f"leaf {'/'.join(map(str, path))} = {value!r}"
    if kind == "swap":  # two tensors claim each other's bytes
        tensors = [v for p, v in nodes if len(p) >= 2 and p[-2] == "tensors" and isinstance(v, dict) and "offset" in v]
        if len(tensors) < 2:
            return "swap: too few tensors"
        a, b = (tensors[int(i)] for i in rng.choice(len(tensors), 2, replace=False))
        key = str(rng.choice(["offset", "scales_offset", "biases_offset"]))
        if key in a and key in b:
            a[key], b[key] = b[key], a[key]
        return f"swap {key}"
    kinds = (dict, list) if kind != "duplicate" else list
    containers = [(p, v) for p, v in nodes if isinstance(v, kinds) and v]
    path, node = containers[int(rng.integers(len(containers)))]
    where = "/".join(map(str, path))
    if kind == "delete":
        key = str(rng.choice(sorted(node))) if isinstance(node, dict) else int(rng.integers(len(node)))
        del node[key]
        return f"delete {where}/{key}"
    if kind == "add":
        if isinstance(node, dict):
            key = str(rng.choice(KEYS))
            node[key] = value = _random_value(rng, node.get(key))
            return f"add {where}/{key} = {value!r}"
        node.append(value := _random_value(rng, node[-1]))
        return f"append {where} {value!r}"
    i = int(rng.integers(len(node)))  # duplicate
    node.insert(i, copy.deepcopy(node[i]))
    return f"duplicate {where}[{i}]"


def _mutate_file(rng, path, rel):
    """Random bytes in a binary file's preamble fields, or one non-zero byte in its reserved tail.
    Returns a description, and whether a byte changed (then the file must be refused)."""
    data = bytearray(path.read_bytes()[:PREAMBLE])
    before = bytes(data)
    if rng.random() < 0.5:
        at, n = int(rng.integers(64)), int(rng.integers(1, 5))
        data[at:at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        what = f"bytes {at}..{at + n - 1}"
    else:
        at = int(rng.integers(32, PREAMBLE))
        data[at] = int(rng.integers(1, 256))
        what = f"tail byte {at}"
    with open(path, "r+b") as f:
        f.write(data)
    return f"{rel} preamble {what}", data != before


def _make_case(rng, base, header, dst):
    """A copy of base (data files hard-linked, so that writing one means replacing it) with 1-3 mutations.
    Returns its description and whether the loader must refuse it."""
    shutil.copytree(base, dst, copy_function=os.link)
    h = copy.deepcopy(header)
    what, must_refuse = [], False
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.8:
            what.append(_mutate_header(rng, h))
        else:
            files = sorted(dst.rglob("*.bin"))
            target = files[int(rng.integers(len(files)))]
            if target.stat().st_nlink > 1:
                os.unlink(target)
                shutil.copyfile(base / target.relative_to(dst), target)
            desc, changed = _mutate_file(rng, target, target.relative_to(dst))
            what.append(desc)
            must_refuse |= changed
    os.unlink(dst / "flashmoe.json")
    text = json.dumps(h)
    if rng.random() < 0.05:  # damage the JSON text itself
        cut = int(rng.integers(len(text)))
        text = text[:cut]
        what.append(f"header cut at {cut}")
        must_refuse = True
    (dst / "flashmoe.json").write_text(text)
    return "; ".join(what), must_refuse


def _run(cases):
    """Run the cases in child processes; returns {index: result}. A child that dies (signal, hang) is
    charged to the case it had started, and a new child carries on with the next one."""
    results, todo = {}, list(range(len(cases)))
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate("".join(f"{i} {cases[i]['path']}\n" for i in todo), timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = f"timed out after {TIMEOUT} s\n{err}"
        started = None
        for line in out.splitlines():
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["done"]] = msg
                started = None
        if proc.returncode == 0 and started is None:
            assert all(i in results for i in todo), err
            break
        assert started is not None, f"child failed outside a case (exit {proc.returncode}): {err[-3000:]}"
        results[started] = {"crash": proc.returncode, "stderr": err[-3000:]}
        todo = todo[todo.index(started) + 1:]
    return results


def test_fuzz_loader(tmp_path):
    base = tmp_path / "base"
    write_random_model(base, TINY, bits=4, progress=False)
    header = json.loads((base / "flashmoe.json").read_text())
    rng = np.random.default_rng(0)
    cases = []
    for i in range(N_CASES):
        dst = tmp_path / f"case{i:03d}"
        what, must_refuse = _make_case(rng, base, header, dst)
        cases.append({"path": os.fspath(dst), "what": what, "must_refuse": must_refuse})
    results = _run(cases)

    def escaped(case, r):
        if "crash" in r:
            return True
        if r["error"] is None:  # it loaded and ran: it must have been a model, and computed numbers
            return case["must_refuse"] or not r["finite"]
        return not r["flashmoe"]

    bad = [f"case {i} ({cases[i]['what']}): {r}" for i, r in sorted(results.items()) if escaped(cases[i], r)]
    assert not bad, f"{len(bad)} of {N_CASES} mutated models escaped:\n" + "\n".join(bad)
    refused = sum(r["error"] is not None for r in results.values())
    # The mutations must mostly hit something the loader checks, or the test would prove little.
    assert N_CASES // 2 <= refused < N_CASES, refused
