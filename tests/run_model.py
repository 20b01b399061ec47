"""One model on one backend, for the GPU backends' whole-model tests (tests/backend_runs.py): run in a
subprocess on the build under test (the emulated Metal one, a CUDA one).

    python run_model.py MODEL_DIR BACKEND IDS.npy OUT.npz [key=value ...]   (load options as Python literals,
                                                                             e.g. prefill_chunk=16)

Writes prefill (the logits of every prompt position in one call), split (the same in two calls, cut at
position 16), steps (the same positions fed one token at a time), greedy (the ids of 6 greedy tokens after
the prompt) and device (Model.stats' device_expert_slots, _hits, _misses, device_bytes_in and
device_host_experts: CUDA's VRAM tier and the host's share of its misses, zeros elsewhere) to OUT.npz.
"""

import ast
import sys

import numpy as np

import flashmoe


def main(model_dir, backend, ids_path, out_path, *options):
    ids = np.load(ids_path).tolist()
    kw = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in options)}
    m = flashmoe.load(model_dir, backend=backend, **kw)
    assert m.backend == backend, (m.backend, backend)
    prefill = m.forward(ids)
    split = prefill if len(ids) <= 16 else np.concatenate([m.forward(ids[:16]),
                                                           m.forward(ids[16:], reset=False)])
    steps = np.stack([m.forward(ids[:1])[0]] + [m.forward(ids[i:i + 1], reset=False)[0] for i in range(1, len(ids))])
    greedy = m.generate_tokens(ids, max_tokens=6, stop_token_ids=[])
    st = m.stats  # a GPU backend's own expert cache (CUDA's VRAM tier): slots, hits, misses, bytes in
    device = [st["device_expert_slots"], st["device_expert_hits"], st["device_expert_misses"], st["device_bytes_in"],
              st["device_host_experts"]]
    np.savez(out_path, prefill=prefill, split=split, steps=steps, greedy=np.asarray(greedy, np.int64),
             device=np.asarray(device, np.int64))


if __name__ == "__main__":
    main(*sys.argv[1:])
