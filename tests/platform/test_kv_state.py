"""Aggregation and version state in JetStream KV: shared by replicas, survives restarts."""

from __future__ import annotations

import asyncio

from shared import bus, subjects
from shared.embedded import EmbeddedNats
from shared.messages import Group


async def _kv(url: str, bucket: str):  # type: ignore[no-untyped-def]
    nc = await bus.connect(url, name="kv-test", reconnect_forever=False)
    js = nc.jetstream()
    await bus.ensure_topology(js)
    return nc, await js.key_value(bucket)


async def test_group_completes_once_across_replicas_and_restarts(nats_server: EmbeddedNats) -> None:
    group = Group("MIPS-1-ch1-bcd", 0, 3)
    nc1, kv1 = await _kv(nats_server.url, subjects.KV_GROUPS)
    first = bus.GroupTracker(kv1)
    a = await first.arrive(group, version=1, member_key="k0", redelivered=False)
    b = await first.arrive(Group(group.id, 1, 3), version=1, member_key="k1", redelivered=False)
    assert not a.trigger and not b.trigger and not b.complete
    await nc1.drain()  # the first replica goes away; its state does not

    nc2, kv2 = await _kv(nats_server.url, subjects.KV_GROUPS)
    second = bus.GroupTracker(kv2)
    c = await second.arrive(Group(group.id, 2, 3), version=1, member_key="k2", redelivered=False)
    assert c.trigger and c.members == {0: "k0", 1: "k1", 2: "k2"}
    # a second delivery of a member of a complete group whose work is not done re-triggers
    again = await second.arrive(Group(group.id, 1, 3), version=1, member_key="k1", redelivered=True)
    assert again.trigger
    await second.done(group.id, version=1)
    after = await second.arrive(Group(group.id, 1, 3), version=1, member_key="k1", redelivered=True)
    assert after.complete and not after.trigger
    # a new version of the group is a new group
    v2 = await second.arrive(Group(group.id, 0, 3), version=2, member_key="k0", redelivered=False)
    assert not v2.complete
    await nc2.drain()


async def test_concurrent_arrivals_trigger_exactly_once(nats_server: EmbeddedNats) -> None:
    n = 12
    conns = [await _kv(nats_server.url, subjects.KV_GROUPS) for _ in range(3)]
    trackers = [bus.GroupTracker(kv) for _, kv in conns]
    arrivals = await asyncio.gather(
        *(
            trackers[i % 3].arrive(
                Group("race", i, n), version=1, member_key=f"k{i}", redelivered=False
            )
            for i in range(n)
        )
    )
    assert sum(a.trigger for a in arrivals) == 1
    for nc, _ in conns:
        await nc.drain()


async def test_version_counter(nats_server: EmbeddedNats) -> None:
    nc, kv = await _kv(nats_server.url, subjects.KV_VERSIONS)
    reg = bus.VersionRegistry(kv)
    assert await reg.version("MIPS.bcd.1.1.2.3", source="S:10", redelivered=False) == 1
    # the same message delivered again (after a crash) rewrites the same version
    assert await reg.version("MIPS.bcd.1.1.2.3", source="S:10", redelivered=True) == 1
    # a replay (first delivery again) or a new submission is a reprocessing
    assert await reg.version("MIPS.bcd.1.1.2.3", source="S:10", redelivered=False) == 2
    assert await reg.version("MIPS.bcd.1.1.2.3", source="S:57", redelivered=False) == 3
    assert await reg.version("MIPS.bcd.9.1.2.3", source="S:57", redelivered=False) == 1
    await nc.drain()


async def test_generations_meet_members_whose_versions_differ(nats_server: EmbeddedNats) -> None:
    """A band-merge group keyed by generation: the two bands of one submission meet in
    generation 1 although one band's products are at version 2 (it was processed before); a
    redelivery keeps its generation; a replay of both bands meets in generation 2."""
    nc, kv = await _kv(nats_server.url, subjects.KV_GROUPS)
    groups = bus.GroupTracker(kv)
    b24, b70 = Group("MIPS-7-mosaics-run1", 0, 2), Group("MIPS-7-mosaics-run1", 1, 2)

    async def arrive(group: Group, key: str, redelivered: bool = False) -> bus.GroupArrival:
        gen = await groups.generation(group, member_key=key)
        return await groups.arrive(group, version=gen, member_key=key, redelivered=redelivered)

    first = await arrive(b24, "ch1_v2_sources")
    assert not first.trigger
    assert await groups.generation(b24, member_key="ch1_v2_sources") == 1  # redelivery
    both = await arrive(b70, "ch2_v1_sources")
    assert both.trigger and both.members == {0: "ch1_v2_sources", 1: "ch2_v1_sources"}
    await groups.done(b24.id, version=1)
    again = await arrive(b70, "ch2_v1_sources", redelivered=True)
    assert again.complete and not again.trigger
    # a replay of both bands: new products, generation 2, merged once more
    assert not (await arrive(b70, "ch2_v2_sources")).trigger
    replay = await arrive(b24, "ch1_v3_sources")
    assert replay.trigger and replay.members == {0: "ch1_v3_sources", 1: "ch2_v2_sources"}
    await nc.drain()
