from tests.conftest import Client, create_deployment, create_job


async def test_create_and_get(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    resp = await client.get(f"/jobs/{job['job_id']}")
    assert resp.status == 200
    assert await resp.json() == job
