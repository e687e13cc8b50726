"""The router's side of routed serving without Ray: RemoteExperts sends each MoE layer's routed
tokens to in-process expert groups over the real direct channel, runs the shared experts while the
calls are in flight, and the layer's output equals the model's own MoE layer, for a contiguous
placement (the re-sort-free path) and for one with a replicated hot expert (the general path)."""

from __future__ import annotations

import pytest
import torch

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.serve.channel import ExpertChannel, ExpertServer
from raymoe.serve.experts import GroupExperts, RemoteExperts, RouterStats
from raymoe.serve.transport import DirectTransport
from raymoe.serve.placement import Placement, contiguous_placement

TOKEN = "test-token"


class Registry:
    """directory.Registry's stand-in: group -> addresses."""

    def __init__(self, servers):
        self.servers = servers

    def addresses(self, group):
        return [self.servers[group].address]

    def drop_address(self, group, address):
        pass


@pytest.fixture
def model():
    cfg = config_from_dict({"name": "t", "model": {"hidden_size": 32, "num_layers": 2, "num_experts": 8, "top_k": 3,
                                                 "num_shared_experts": 1, "max_seq_len": 128}})
    m = MoETransformer(cfg.model)
    m.init_weights(0)
    return m.eval()


REPLICATED = Placement(num_groups=2, groups=((0, 1, 2, 3, 4), (4, 5, 6, 7)), replicas={**{e: 1 for e in range(8)}, 4: 2})


@pytest.mark.parametrize("placement", [contiguous_placement(8, 2), REPLICATED, contiguous_placement(8, 4)],
                         ids=["contiguous", "replicated", "four-groups"])
def test_remote_layer_output_equals_the_local_moe_layer(model, placement):
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    moe = model.moe_layers()[0]
    with torch.no_grad():
        want, _, _ = moe(x)
    groups = [GroupExperts(model, experts) for experts in placement.groups]
    servers = [ExpertServer(g.run_calls, TOKEN) for g in groups]
    try:
        stats = RouterStats(placement.num_groups)
        channel = ExpertChannel(TOKEN, placement.num_groups, registry=Registry(servers))
        moe.routed = RemoteExperts(0, placement, DirectTransport(channel), stats, shared=moe.shared)
        moe.shared = None
        with torch.no_grad():
            got, _, _ = moe(x)
    finally:
        for s in servers:
            s.close()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sum(stats.tokens) == 2 * 5 * 3  # every routed slot went to exactly one group
    assert max(stats.calls) == 1  # one call per group for the layer
    assert [g.tokens for g in groups] == stats.tokens
    if placement is REPLICATED:
        assert groups[0].tokens > 0 and groups[1].tokens > 0
