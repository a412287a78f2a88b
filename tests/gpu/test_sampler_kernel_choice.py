"""The sampler graphs time every candidate sampling kernel when they capture a (bucket, plan)
and keep the fastest (GPU only): the times are recorded and the graph kept is the fastest
one's; seeded plans keep their kernel, so seeded tokens equal an eager engine's."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402

KW = dict(model="dummy:small-d128", dtype="float32", max_num_seqs=8, max_model_len=512,
          num_kv_blocks=512)  # fmt: skip


def _run(eng, params):
    rids = [eng.add_request(list(range(3 + i, 40 + i)), p) for i, p in enumerate(params)]
    toks = {r: [] for r in rids}
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id].extend(o.new_token_ids)
    return [toks[r] for r in rids]


def test_the_fastest_measured_kernel_is_kept():
    eng = Engine(async_scheduling=False, **KW)
    sg = eng.runner.sampler_graphs
    assert sg is not None and sg.measure
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12) for _ in range(2)]
    _run(eng, params)
    assert sg.choices, "no plan was captured with measured candidates"
    for key, times in sg.choices.items():
        assert len(times) >= 2 and all(t > 0 for t in times.values())
        kept = sg._graphs[key][1].drawn_by.name
        assert kept == min(times, key=times.get), (key, times)


def test_seeded_plans_are_not_measured_and_draw_the_eager_tokens():
    eng = Engine(async_scheduling=False, **KW)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=12) for s in (1, 2)]
    got = _run(eng, params)
    assert len(eng.runner.sampler_graphs) > 0 and not eng.runner.sampler_graphs.choices
    assert got == _run(Engine(enforce_eager=True, **KW), params)
