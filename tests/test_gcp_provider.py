"""The gcp provider through the real google-cloud-compute client, over HTTP, against the local Compute
fake (tests/fakes/gce.py): the VM it asks for, gangs and their placement policies, typed refusals, retries,
describe, reap, prices, the checks `vl run` makes before anything starts, and the IAM roles in deploy/gcp/."""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from temporalio.exceptions import ApplicationError

from activities.control import ControlActivities
from activities.providers.base import NoCapacityError, ProviderError
from activities.providers.gcp import GcpProvider, label_value
from cli.cmd_run import request_from_args
from cli.main import parser
from tests.conftest import REPO
from tests.fakes.gce import (
    API,
    BACKEND_ERROR,
    HOST_SERVICE_ACCOUNT,
    RATE_LIMITED,
    RATE_LIMITED_403,
    error_body,
    parse_startup_script,
    quota_exceeded,
    stockout,
)
from vaultlayer.catalog.gcp import priced
from vaultlayer.models import AgentRef, HostState, Market, Placement, Pool, ProvisionInput
from vaultlayer.request import RunRequestError, build_spec

ZONE = "us-central1-a"


def pool(zone: str = ZONE, gpu: str = "L4", count: int = 1, market: Market = Market.SPOT) -> Pool:
    return Pool(provider="gcp", region="", zone=zone, gpu=gpu, gpu_count=count, market=market)


def ask(run_id: str, chosen: Pool, attempt: int = 1, nodes: int = 1) -> ProvisionInput:
    return ProvisionInput(run_id=run_id, placement=Placement(pool=chosen, attempt=attempt, nodes=nodes))


@pytest.fixture
def provider(gce, vl_home) -> GcpProvider:
    return GcpProvider(vl_home, {})


@pytest.fixture
def control(gce, vl_home) -> ControlActivities:
    """The control activities, called directly (they are plain methods outside a worker)."""
    return ControlActivities(vl_home=vl_home, temporal_env={})


def metadata_of(resource: dict) -> dict[str, str]:
    return {item["key"]: item["value"] for item in resource["metadata"]["items"]}


def test_a_spot_vm_is_created_as_the_contract_says(gce, provider):
    gce.secrets["vaultlayer-temporal"] = b'{"TEMPORAL_ADDRESS": "temporal.internal:7233", "TEMPORAL_API_KEY": "k"}'
    host = provider.provision(ask("t-Contract.1", pool())).host

    [vm] = gce.instances()
    assert vm["name"] == host.host_id == "vl-t-contract-1-1"
    assert vm["machineType"].endswith("/zones/us-central1-a/machineTypes/g2-standard-4")
    assert "guestAccelerators" not in vm  # g2 comes with its L4
    assert vm["scheduling"] == {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                                "onHostMaintenance": "TERMINATE", "automaticRestart": False}
    assert vm["labels"] == {"vaultlayer-run-id": "t-contract_1", "vaultlayer-attempt": "1"}
    assert vm["serviceAccounts"][0]["email"] == HOST_SERVICE_ACCOUNT
    assert vm["disks"][0]["initializeParams"]["sourceImage"].startswith("projects/deeplearning-platform-release/")
    assert vm["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
    metadata = metadata_of(vm)
    assert metadata["vaultlayer-run-id"] == "t-Contract.1"
    exports, agent = parse_startup_script(metadata["startup-script"])
    assert exports["VL_TEMPORAL_SETTINGS"] == \
        "gcp-secret-manager:projects/vl-test/secrets/vaultlayer-temporal/versions/latest"
    assert exports["VL_NOTICE_SOURCE"] == "gce-metadata"
    assert agent[agent.index("--task-queue") + 1] == host.task_queue
    assert agent[agent.index("--host-id") + 1] == host.host_id
    assert "temporal.internal" not in json.dumps(vm) and '"k"' not in json.dumps(vm)  # the secret stays a secret
    assert (host.price_per_hour, host.on_demand_price_per_hour) == (0.2827, 0.7068)
    assert host.handle == {"project": "vl-test", "zone": ZONE, "instance": host.host_id, "id": vm["id"]}
    provider.release(host)


def test_on_demand_and_attached_gpus(gce, provider, vl_home):
    (vl_home / "gcp.toml").write_text(
        f'project = "vl-test"\nservice_account = "{HOST_SERVICE_ACCOUNT}"\nexternal_ip = false\n'
        'setup = ["git clone https://example.com/code /opt/code"]\n'
        '[prices."us-central1/nvidia-tesla-t4"]\nspot = 0.1\non_demand = 0.3\n')
    # No `package` set: the host installs the run's own agent wheel, fetched with the VM's own token.
    agent = AgentRef(url="gs://vl-runs/_code/agents/" + "ab" * 32 + "/vaultlayer-0.1.0-py3-none-any.whl",
                     sha256="ab" * 32, pins=["temporalio==1.35.0"])
    request = ask("t-t4", pool(gpu="T4", count=2, market=Market.ON_DEMAND)).model_copy(update={"agent": agent})
    host = provider.provision(request).host

    [vm] = gce.instances()
    assert vm["machineType"].endswith("/machineTypes/n1-standard-16")
    assert vm["guestAccelerators"] == [{"acceleratorType": f"{API}/projects/vl-test/zones/{ZONE}/acceleratorTypes/"
                                                           "nvidia-tesla-t4", "acceleratorCount": 2}]
    assert vm["scheduling"] == {"provisioningModel": "STANDARD", "onHostMaintenance": "TERMINATE",
                                "automaticRestart": False}
    assert "accessConfigs" not in vm["networkInterfaces"][0]
    script = metadata_of(vm)["startup-script"]
    assert "git clone https://example.com/code /opt/code" in script
    assert "storage/v1/b/vl-runs/o/_code%2Fagents%2F" in script and "Metadata-Flavor: Google" in script
    assert f"{'ab' * 32}  /opt/vaultlayer/vaultlayer-0.1.0-py3-none-any.whl' | sha256sum --check" in script
    assert "'/opt/vaultlayer/vaultlayer-0.1.0-py3-none-any.whl[gcp]'" in script and "vaultlayer[gcp]==" not in script
    # n1-standard-16 from the bundled table, plus two T4 at the price gcp.toml sets for the region
    assert host.price_per_hour == host.on_demand_price_per_hour == round(0.76 + 2 * 0.3, 4)
    assert priced(pool(gpu="T4", count=2)).price_per_hour == round(0.1604 + 2 * 0.1, 4)
    provider.release(host)


@pytest.mark.parametrize("case", ["stockout", "stockout-with-details", "quota", "no-such-gpu", "no-such-machine"])
def test_capacity_errors_are_typed_refusals(gce, control, case):
    gpu = "L4"
    if case == "stockout":
        gce.insert_errors[ZONE] = stockout(gce.project, ZONE)
    elif case == "stockout-with-details":
        gce.insert_errors[ZONE] = stockout(gce.project, ZONE, with_details=True)
    elif case == "quota":
        gce.insert_errors[ZONE] = quota_exceeded("us-central1")
    elif case == "no-such-gpu":
        gce.not_offered[ZONE] = {"nvidia-tesla-t4"}
        gpu = "T4"
    else:
        gce.not_offered[ZONE] = {"g2-standard-4"}

    result = control.provision(ask("t-refused", pool(gpu=gpu)))

    expected = {"stockout": "no-capacity", "stockout-with-details": "no-capacity", "quota": "quota",
                "no-such-gpu": "unsupported", "no-such-machine": "unsupported"}[case]
    assert result.host is None and result.refusal == expected, result
    code = {"stockout": "ZONE_RESOURCE_POOL_EXHAUSTED:", "stockout-with-details": "_WITH_DETAILS",
            "quota": "QUOTA_EXCEEDED", "no-such-gpu": "does not exist in zone",
            "no-such-machine": "does not exist in zone"}[case]
    assert code in result.message
    assert gce.instances() == []


def test_rate_limits_and_server_errors_are_retried(gce, provider):
    gce.fail_next("POST", r"/zones/[^/]+/instances$", *RATE_LIMITED)
    gce.fail_next("POST", r"/zones/[^/]+/instances$", *BACKEND_ERROR)
    gce.fail_next("POST", r"/operations/[^/]+/wait$", *BACKEND_ERROR)
    gce.fail_next("GET", r"/instances/[^/]+$", *RATE_LIMITED_403)

    host = provider.provision(ask("t-retried", pool())).host

    assert [vm["name"] for vm in gce.instances()] == [host.host_id]
    inserts = [path for method, path in gce.requests if method == "POST" and path.endswith("/instances")]
    assert len(inserts) == 3 and len(gce.by_request_id) == 1  # one request id across the retries: one VM
    provider.release(host)


def test_operation_errors_are_surfaced(gce, provider, control):
    gce.insert_errors[ZONE] = {"code": "RESOURCE_NOT_FOUND",
                               "message": "The resource 'projects/vl-test/global/images/missing' was not found"}
    with pytest.raises(ProviderError, match="RESOURCE_NOT_FOUND: The resource 'projects/vl-test/global/images/"):
        provider.provision(ask("t-broken", pool()))
    denied = "Required 'compute.instances.create' permission for 'projects/vl-test/zones/us-central1-a/instances'"
    gce.fail_next("POST", r"/zones/[^/]+/instances$", 403, error_body(403, denied, "forbidden"))
    with pytest.raises(ApplicationError, match="compute.instances.create") as failed:
        control.provision(ask("t-broken", pool(), attempt=2))
    assert failed.value.non_retryable  # a setting to fix: retrying would not help


def test_describe_tells_a_preempted_vm_from_a_failed_one(gce, provider):
    hosts = {name: provider.provision(ask(f"t-{name}", pool())).host
             for name in ("running", "preempted", "gone-after-preemption", "host-error", "shut-down", "deleted")}
    gce.preempt(hosts["preempted"].host_id, grace_seconds=1)
    gce.preempt(hosts["gone-after-preemption"].host_id, grace_seconds=0)
    gce.host_error(hosts["host-error"].host_id)
    gce.guest_shutdown(hosts["shut-down"].host_id)
    provider.release(hosts["deleted"])
    provider.release(hosts["deleted"])  # idempotent
    gce.settle()  # the deletion is done

    described = {name: provider.describe(host) for name, host in hosts.items()}

    assert described["running"].state == HostState.RUNNING
    for name in ("preempted", "gone-after-preemption"):
        assert described[name].state == HostState.GONE
        assert "compute.instances.preempted" in described[name].reason
    # Gone means stopped: describe waited out the grace period, in which the VM could still write.
    taken = {hosts["preempted"].host_id, hosts["gone-after-preemption"].host_id}
    assert not taken & {vm["name"] for vm in gce.instances()}
    assert described["host-error"].state == HostState.FAULTY
    assert "compute.instances.hostError" in described["host-error"].reason
    assert described["shut-down"].state == HostState.FAULTY
    assert "compute.instances.guestTerminate" in described["shut-down"].reason
    assert described["deleted"].state == HostState.GONE
    for host in hosts.values():
        provider.release(host)


def test_reap_deletes_every_vm_labelled_with_the_run(gce, provider):
    first = provider.provision(ask("t-reaped", pool())).host
    gce.add_instance("europe-west4-b", "vl-t-reaped-lost", labels={"vaultlayer-run-id": label_value("t-reaped")})
    gce.add_instance("us-central1-b", "vl-other", labels={"vaultlayer-run-id": "t-other"})
    gce.add_instance("us-central1-b", "not-ours", labels={"team": "research"})
    assert provider.live_runs() == {"t-reaped", "t-other"}

    assert sorted(provider.reap("t-reaped")) == sorted([first.host_id, "vl-t-reaped-lost"])
    gce.settle()

    assert sorted(vm["name"] for vm in gce.instances()) == ["not-ours", "vl-other"]
    assert provider.live_runs() == {"t-other"}
    assert provider.reap("t-other") == ["vl-other"]


def test_a_vm_deleted_while_its_create_is_held_stays_deleted(gce, provider):
    """The fake's holds, which tests/faults/test_cancel.py forces its order with: a create call held unanswered,
    then its VM held PROVISIONING while a reap deletes it. Released, the create ends and brings nothing back."""
    request, operation = gce.hold_next("POST", r"/zones/[^/]+/instances$"), gce.hold_operations("insert")
    with ThreadPoolExecutor(1) as executor:
        try:
            provisioning = executor.submit(provider.provision, ask("t-held", pool()))
            assert request.wait_held() and not gce.instances()
            request.release()
            assert operation.wait_held()
            [vm] = gce.instances()
            assert vm["status"] == "PROVISIONING"
            assert provider.reap("t-held") == [vm["name"]]  # deletions are not held: it goes
            with gce.cond:
                gce.wait_until(lambda: not gce.vms, timeout=30)
            assert not gce.instances() and not provisioning.done()
        finally:
            gce.release_holds()
        with pytest.raises(NoCapacityError, match="was created, then taken back before it started"):
            provisioning.result(timeout=60)
    gce.settle()
    assert not gce.instances()


def test_a_gang_is_vms_of_one_zone_under_a_compact_placement_policy(gce, provider):
    hosts = provider.provision(ask("t-gang", pool(), nodes=2)).hosts
    assert [host.host_id for host in hosts] == ["vl-t-gang-1-n0", "vl-t-gang-1-n1"]
    [policy] = gce.resource_policies()
    assert policy["name"] == "vl-t-gang-1-gang" and policy["groupPlacementPolicy"] == {"collocation": "COLLOCATED"}
    assert policy["region"].endswith("/regions/us-central1")
    assert policy["description"] == "vaultlayer-run-id=t-gang vaultlayer-attempt=1"
    vms = {vm["name"]: vm for vm in gce.instances()}
    for node, host in enumerate(hosts):
        vm = vms[host.host_id]
        assert vm["zone"].endswith(f"/zones/{ZONE}") and host.handle["zone"] == ZONE
        assert vm["labels"] == {"vaultlayer-run-id": "t-gang", "vaultlayer-attempt": "1",
                                "vaultlayer-gang": "t-gang-a1", "vaultlayer-node": str(node)}
        assert vm["resourcePolicies"] == [policy["selfLink"]]
        assert host.address == vm["networkInterfaces"][0]["networkIP"]
        _, agent = parse_startup_script(metadata_of(vm)["startup-script"])
        assert agent[agent.index("--task-queue") + 1] == host.task_queue
        assert agent[agent.index("--host-id") + 1] == host.host_id
    assert len({host.address for host in hosts}) == len({host.task_queue for host in hosts}) == 2

    again = provider.provision(ask("t-gang", pool(), nodes=2)).hosts  # a retried provision
    assert [(h.host_id, h.handle, h.address) for h in again] == [(h.host_id, h.handle, h.address) for h in hosts]
    assert len(gce.instances()) == 2 and len(gce.resource_policies()) == 1

    for host in hosts:
        provider.release(host)
    assert provider.reap("t-gang") == []  # both on their way out; it waits for them, then deletes the policy
    gce.settle()
    assert gce.instances() == [] and gce.resource_policies() == []


def test_a_gang_of_n1_vms_has_no_placement_policy(gce, provider):
    """Compact placement takes no N1 machine: the gang is still one zone's."""
    hosts = provider.provision(ask("t-n1", pool(gpu="T4"), nodes=2)).hosts
    assert gce.resource_policies() == [] and "placement_policy" not in hosts[0].handle
    assert all("resourcePolicies" not in vm for vm in gce.instances())
    assert sorted(provider.reap("t-n1")) == sorted(host.host_id for host in hosts)


def test_a_gang_the_zone_can_give_only_part_of_leaves_nothing_behind(gce, provider):
    gce.capacity[ZONE] = 1
    with pytest.raises(NoCapacityError, match="^1 of 2 hosts: ZONE_RESOURCE_POOL_EXHAUSTED: ") as caught:
        provider.provision(ask("t-short", pool(), nodes=2))
    assert caught.value.kind == "no-capacity" and caught.value.held_host_seconds > 0
    gce.settle()
    assert gce.instances() == [] and gce.resource_policies() == []
    assert provider.provision(ask("t-short", pool(), attempt=2)).host  # one VM fits
    provider.reap("t-short")


def test_a_placement_policy_left_behind_is_found_by_the_next_gang_and_the_reap(gce, provider):
    deleting = gce.hold_operations("delete")  # the VMs take their time to go
    try:
        for host in provider.provision(ask("t-left", pool(), nodes=2)).hosts:
            provider.release(host)  # the policy is in use until its VMs have gone: left
    finally:
        deleting.release()
    gce.settle()
    assert [policy["name"] for policy in gce.resource_policies()] == ["vl-t-left-1-gang"]
    assert provider.live_runs() == {"t-left"}  # the sweep sees it
    provider.provision(ask("t-left", pool(), attempt=2, nodes=2))  # the run's next gang deletes it on the way
    gce.settle()
    assert [policy["name"] for policy in gce.resource_policies()] == ["vl-t-left-2-gang"]
    assert len(provider.reap("t-left")) == 2
    gce.settle()
    assert gce.instances() == [] and gce.resource_policies() == [] and provider.live_runs() == set()


def test_a_retried_provision_takes_the_vm_of_the_first_try(gce, provider):
    first = provider.provision(ask("t-again", pool())).host
    again = provider.provision(ask("t-again", pool())).host
    assert again.host_id == first.host_id and len(gce.instances()) == 1
    gce.preempt(first.host_id)  # the first try's VM is going away: a new one, under another name
    third = provider.provision(ask("t-again", pool())).host
    assert third.host_id.startswith(first.host_id + "-") and third.host_id != first.host_id
    for host in (first, third):
        provider.release(host)


def test_the_iam_roles_grant_what_the_provider_uses(gce, provider):
    host = provider.provision(ask("t-iam", pool())).host
    provider.describe(host)
    provider.release(host)
    for node in provider.provision(ask("t-iam", pool(), attempt=2, nodes=2)).hosts:
        provider.release(node)
    provider.reap("t-iam")
    provider.live_runs()
    from activities.providers.gcp import read_temporal_settings

    gce.secrets["vaultlayer-temporal"] = b'{"TEMPORAL_ADDRESS": "temporal.internal:7233"}'
    read_temporal_settings("gcp-secret-manager:projects/vl-test/secrets/vaultlayer-temporal/versions/latest")

    def granted(name: str) -> set[str]:
        """The `- permission` items of a role file's includedPermissions list."""
        listing = (REPO / "deploy" / "gcp" / name).read_text().split("includedPermissions:", 1)[1]
        return set(re.findall(r"^- (\S+)$", listing, re.MULTILINE))

    used = gce.permissions
    host_side = {permission for permission in used if permission.startswith("secretmanager.")}
    # actAs on the hosts' service account comes from roles/iam.serviceAccountUser on it (deploy/gcp/README.md)
    assert used - host_side - {"iam.serviceAccounts.actAs"} <= granted("worker-role.yaml")
    assert host_side <= granted("host-role.yaml") and host_side
    assert "iam.serviceAccounts.actAs" in used


def run_args(*flags: str):
    """`vl run --provider gcp FLAGS -- python -c pass`, parsed as `vl` does."""
    args = parser().parse_args(["run", "--provider", "gcp", "--run-id", "t-checked", *flags, "--", sys.executable,
                                "-c", "pass"])
    return request_from_args(args)


@pytest.mark.parametrize("flags, message", [
    (["--zone", ZONE], "give --gpu"),
    (["--gpu", "K80:1", "--zone", ZONE], "--gpu K80: not a GPU class"),
    (["--gpu", "L4:3", "--zone", ZONE], "gcp offers L4 VMs with 1, 2, 4, 8 GPUs"),
    (["--gpu", "L4:1", "--region", "us-central1"], "give --zone"),
    (["--gpu", "L4:1", "--zone", "us-central1"], "not a Compute Engine zone name"),
    (["--gpu", "L4:1", "--region", "us-east1", "--zone", ZONE], "is in us-central1, not in --region us-east1"),
])
def test_bad_pools_are_refused_before_anything_starts(gce, flags, message):
    with pytest.raises(RunRequestError, match=message):
        build_spec(run_args(*flags))
    assert gce.requests == []


def test_settings_and_credentials_are_checked_before_anything_starts(gce, vl_home, monkeypatch, tmp_path):
    args = run_args("--gpu", "L4:1", "--zone", ZONE, "--zone", "us-central1-b")
    spec = build_spec(args)
    assert [(p.region, p.zone, p.price_per_hour) for p in spec.pools] == [("", ZONE, 0.2827),
                                                                          ("", "us-central1-b", 0.2827)]

    (vl_home / "gcp.toml").write_text('project = "vl-test"\nservice_acount = "typo@vl-test.iam.gserviceaccount.com"\n')
    with pytest.raises(RunRequestError, match="service_account: Field required.*service_acount: Extra inputs"):
        build_spec(args)
    (vl_home / "gcp.toml").unlink()
    with pytest.raises(RunRequestError, match="needs its settings in .*gcp.toml"):
        build_spec(args)

    (vl_home / "gcp.toml").write_text(f'project = "vl-test"\nservice_account = "{HOST_SERVICE_ACCOUNT}"\n')
    monkeypatch.delenv("VL_GCP_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    with pytest.raises(RunRequestError, match="no Google Cloud credentials"):
        build_spec(args)
    assert gce.requests == []
