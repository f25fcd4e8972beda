from tests.harness import running_edges, paired

async def test_smoke(nats_url):
    async with running_edges(nats_url) as (a, b):
        m, i, mac = await paired(a, b)
        await m.send(type="relay", payload="aGVsbG8=")
        got = await i.expect("relay")
        assert got == {"type": "relay", "payload": "XX"}
        await i.send(type="relay_batch", payloads=["YQ==", "Yg=="])
        assert (await m.expect("relay_batch"))["payloads"] == ["YQ==", "Yg=="]
        await m.close()
        assert (await i.expect("peer_disconnected"))["reason"] == "client_left"
