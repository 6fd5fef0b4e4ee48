"""Real federated rounds on loopback: a Flower server with fl4health's strategy and fl4health clients
(two unless ``--clients``), once with fl4health's own selection functions and once with layersel_ext
patched in.

    python -m examples.federated_rounds            # every mode, fl4health vs patched, a summary
    python -m examples.federated_rounds --mode fedpm_linear_n_1
    python -m examples.federated_rounds --compare-wires --mode fedpm_mlp --clients 4 --rounds 5

FedPM and sparse modes also run with every other wire of ``layersel_ext.fl4health.WIRES``
(``patch(wire="compact")``: layersel_ext.wire / wire_coo); every run reports the bytes of the
serialized Flower messages each client sends and the server returns.

Modes: layer_threshold, layer_percentage (DynamicLayerExchanger + FedAvgDynamicLayer),
sparse and sparse_0.4 (SparseCooParameterExchanger at sparsity 0.1 / 0.4 + FedAvgSparseCooTensor), fedpm (masked CNN, FedPmServer +
FedPm), fedpm_linear_n_1 (a masked Linear(n, 1): fl4health's squeezed masks break it), fedpm_cnn and
fedpm_mlp (WIRE_MODES: a masked CNN and a masked MLP of 0.6M and 1.9M scores, trained with Adam for an
epoch a round on a task they can learn).
Server and clients are separate processes on 127.0.0.1; synthetic data. Each client seeds itself
as fl4health's examples do (set_all_random_seeds(42), the same on every client). The clients start
with the server and connect once it accepts connections on a fresh port; every federation is bounded in time, and the
full server and client logs of a failed one are printed (run_federation, explain).
What reached the server each round is recorded by the server process into a JSON file: names,
dtypes, shapes and a hash of every client's arrays; for FedPM also how often the clients' mask
bits agree, the fraction of the scores sent back to the clients that are +-inf, a hash of the
aggregated model, and what an ideal coder of the masks would send given the theta the server last
sent (prior_cost).

``--compare-wires`` runs the FedPM wire comparison (run_wire_comparison, summarize_wires,
wire_table): the same federation with fl4health alone and on every wire, per round the bytes each
client sent, bits per mask element, and whether the aggregated models are bitwise equal across the
wires; ``python -m benchmarks.fedpm_wire`` runs it on both models with 2 and 4 clients and writes
the results files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = (
    "layer_threshold", "layer_percentage", "sparse", "sparse_0.4", "fedpm", "fedpm_linear_n_1", "fedpm_cnn", "fedpm_mlp",
)  # fmt: skip
SPARSITY = {"sparse": 0.1, "sparse_0.4": 0.4}  # 0.4: fl4health's research sweeps on BERT
# The wire comparison's models (compare_wires): large enough that the framing is a small part of a
# message (0.6M and 1.3M mask elements), trained for an epoch a round on a task they can learn.
WIRE_MODES = ("fedpm_cnn", "fedpm_mlp")
ROOT = Path(__file__).resolve().parents[1]
# The precision of the quantized theta in the ideal coded size (run_server's prior_cost): that of the
# coded wire (layersel_ext.wire_coded: q = floor(theta * 2**15 + 1/2)).
PRIOR_BITS = 15


# ------------------------------------------------------------------------------------------ models/data


def make_model(mode: str) -> Any:
    """The same initial model in every process, without touching the caller's global RNG state (each
    client seeds itself as fl4health's examples do; see run_client)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _make_model(mode)


def _make_model(mode: str) -> Any:
    from torch import nn

    if mode == "fedpm_linear_n_1":
        from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

        return nn.Sequential(MaskedLinear(8, 1))
    if mode == "fedpm":
        from fl4health.model_bases.masked_layers.masked_conv import MaskedConv2d
        from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

        return nn.Sequential(MaskedConv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), MaskedLinear(4 * 6 * 6, 10))
    if mode == "fedpm_cnn":  # 3x16x16 inputs; 612,042 mask elements
        from fl4health.model_bases.masked_layers.masked_conv import MaskedConv2d
        from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

        return nn.Sequential(
            MaskedConv2d(3, 32, 3), nn.ReLU(), MaskedConv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            MaskedLinear(64 * 6 * 6, 256), nn.ReLU(), MaskedLinear(256, 10),
        )  # fmt: skip
    if mode == "fedpm_mlp":  # 768 inputs (3x16x16 flattened); 1,851,402 mask elements
        from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear
        from fl4health.model_bases.masked_layers.masked_normalization_layers import MaskedLayerNorm

        return nn.Sequential(
            nn.Flatten(), MaskedLinear(768, 1024), MaskedLayerNorm(1024), nn.ReLU(), MaskedLinear(1024, 1024),
            MaskedLayerNorm(1024), nn.ReLU(), MaskedLinear(1024, 10),
        )  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
        nn.Linear(16, 10),
    )  # fmt: skip


def make_loaders(index: int, mode: str) -> tuple[Any, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(100 + index)
    if mode in WIRE_MODES:
        # A task the clients can learn: 10 classes given by one fixed random linear teacher (the same
        # on every client), each client its own 256 inputs; an epoch is 8 steps of 32.
        teacher = torch.randn(3 * 16 * 16, 10, generator=torch.Generator().manual_seed(7))
        x = torch.randn(256, 3, 16, 16, generator=g)
        data = TensorDataset(x, (x.flatten(1) @ teacher).argmax(1))
        return DataLoader(data, batch_size=32, shuffle=False), DataLoader(data, batch_size=64, shuffle=False)
    x = torch.randn(64, 1, 8, 8, generator=g)
    if mode == "fedpm_linear_n_1":
        x = torch.randn(64, 8, generator=g)
        y = (x.sum(1, keepdim=True) > 0).float()
    else:
        y = torch.randint(0, 10, (64,), generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16, shuffle=False), DataLoader(data, batch_size=32, shuffle=False)


# ------------------------------------------------------------------------------------------ client


def wait_for_port(port_file: Path, wait_s: float) -> int:
    """The server's port, once the harness has written it to ``port_file`` (it does when the server
    listens): a client imports and builds everything while the server starts, then connects."""
    deadline = time.monotonic() + wait_s
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no server port in {port_file} after {wait_s:.0f} s")
        time.sleep(0.05)
    return int(port_file.read_text())


def run_client(mode: str, index: int, port: int, port_file: Path | None = None, wait_s: float = 0.0) -> None:
    import flwr as fl
    import torch
    from fl4health.clients.fedpm_client import FedPmClient
    from fl4health.clients.partial_weight_exchange_client import PartialWeightExchangeClient
    from fl4health.parameter_exchange import parameter_selection_criteria as criteria
    from fl4health.parameter_exchange.layer_exchanger import DynamicLayerExchanger
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger
    from fl4health.utils.random import set_all_random_seeds

    # As every fl4health example client does (`set_all_random_seeds(args.seed)`, default 42): the
    # same seed for python, numpy and torch on every client. Whatever is random per client (FedPM's
    # masks) must not come out the same on both because of it.
    set_all_random_seeds(42)
    regression = mode == "fedpm_linear_n_1"

    class Common:
        def get_data_loaders(self, config: Any) -> tuple[Any, Any]:
            return make_loaders(index, mode)

        def get_criterion(self, config: Any) -> Any:
            return torch.nn.BCEWithLogitsLoss() if regression else torch.nn.CrossEntropyLoss()

        def get_optimizer(self, config: Any) -> Any:
            params = [p for p in self.model.parameters() if p.requires_grad]  # type: ignore[attr-defined]
            if mode in WIRE_MODES:
                # FedPM trains the masked layers' scores (their weights are frozen), with Adam at 0.1
                # as the FedPM paper does. No weight decay: a score of +-inf (a mask the server
                # fixed) would become nan.
                return torch.optim.Adam(params, lr=0.1)
            return torch.optim.SGD(params, lr=0.1)

        def get_model(self, config: Any) -> Any:
            return make_model(mode)

        def update_after_train(self, local_steps: int, loss_dict: dict[str, float], config: Any) -> None:
            self.train_loss = float(loss_dict.get("backward", float("nan")))
            super().update_after_train(local_steps, loss_dict, config)  # type: ignore[misc]

        def fit(self, parameters: Any, config: Any) -> Any:  # tells the server which client this is
            arrays, samples, metrics = super().fit(parameters, config)  # type: ignore[misc]
            return arrays, samples, {**metrics, "client_index": index, "train_loss": self.train_loss}

    class PartialClient(Common, PartialWeightExchangeClient):
        def get_parameter_exchanger(self, config: Any) -> Any:
            if mode in SPARSITY:
                return SparseCooParameterExchanger(SPARSITY[mode], criteria.largest_magnitude_change_scores)
            ctor = criteria.LayerSelectionFunctionConstructor(2e-4, 0.5, normalize=True, select_drift_more=True)
            fn = ctor.select_by_percentage() if mode == "layer_percentage" else ctor.select_by_threshold()
            return DynamicLayerExchanger(layer_selection_function=fn)

    class PmClient(Common, FedPmClient):
        pass

    device = torch.device("cpu")
    if mode.startswith("fedpm"):
        client: Any = PmClient(Path("."), [], device, client_name=f"client{index}")
    else:
        client = PartialClient(Path("."), [], device, client_name=f"client{index}", store_initial_model=True)
    if port_file is not None:
        port = wait_for_port(port_file, wait_s)
    fl.client.start_client(server_address=f"127.0.0.1:{port}", client=client.to_client())
    client.shutdown()


# ------------------------------------------------------------------------------------------ server


def digest(arrays: list[Any]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def run_server(mode: str, port: int, rounds: int, out: Path, clients: int = 2) -> None:
    import flwr as fl
    import numpy as np
    import torch
    from fl4health.servers.base_server import FlServer
    from fl4health.servers.fedpm_server import FedPmServer
    from fl4health.strategies.fedavg_dynamic_layer import FedAvgDynamicLayer
    from fl4health.strategies.fedavg_sparse_coo_tensor import FedAvgSparseCooTensor
    from fl4health.strategies.fedpm import FedPm
    from fl4health.utils.functions import sigmoid_inverse
    from fl4health.utils.parameter_extraction import get_all_model_parameters
    from flwr.common import parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager

    def fit_config(current_server_round: int) -> dict[str, Any]:
        steps = {"local_epochs": 1} if mode in WIRE_MODES else {"local_steps": 2}
        return {**steps, "batch_size": 16, "current_server_round": current_server_round, "is_masked_model": True}

    record: list[dict[str, Any]] = []
    kwargs = {
        "min_fit_clients": clients,
        "min_evaluate_clients": clients,
        "min_available_clients": clients,
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": fit_config,
        "fit_metrics_aggregation_fn": lambda metrics: {},  # client_index only labels the record
        "initial_parameters": get_all_model_parameters(make_model(mode)),
    }
    if mode.startswith("fedpm"):
        strategy_cls: Any = FedPm
    elif mode in SPARSITY:
        strategy_cls = FedAvgSparseCooTensor
    else:
        strategy_cls = FedAvgDynamicLayer

    fedpm = mode.startswith("fedpm")
    # FedPM: the score of each element the clients hold at the start of the current round is finite
    # (it is sampled: mask ~ Bernoulli(sigmoid(score))) or +-inf (the mask is fixed). Round 1 starts
    # from the initial model's scores; each later round from sigmoid_inverse(what the server sent).
    held_scores_finite: dict[str, np.ndarray] = {}

    class Recording(strategy_cls):  # type: ignore[misc, valid-type]
        def decoded(self, packed: list[np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
            """Arrays and names of a message, decoded by the strategy's own packer (fl4health's, or
            layersel_ext's compact wire), listed as fl4health's framing lists them (COO: the values,
            the indices and the shapes, then the names)."""
            arrays, extra = self.parameter_packer.unpack_parameters(packed)
            if isinstance(extra, tuple):  # COO: (values, (indices, shapes, names))
                indices, shapes, names = extra
                return [*arrays, *indices, *shapes], list(names)
            return list(arrays), list(extra)

        def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
            clients = []
            for _, fit_res in results:
                arrays, names = self.decoded(parameters_to_ndarrays(fit_res.parameters))
                clients.append({
                    "client": int(fit_res.metrics.get("client_index", -1)),
                    "names": names,
                    "digest": digest(arrays),
                    "dtypes": [str(a.dtype) for a in arrays],
                    "shapes": [list(a.shape) for a in arrays],
                    "arrays": arrays,
                    "bytes_sent": sum(len(t) for t in fit_res.parameters.tensors),
                    **({"train_loss": float(fit_res.metrics["train_loss"])} if "train_loss" in fit_res.metrics else {}),
                    **(prior_cost(names, arrays) if fedpm else {}),
                })  # fmt: skip
            clients.sort(key=lambda c: (c["client"], c["digest"]))
            entry: dict[str, Any] = {"round": server_round, "clients": clients, "failures": len(failures)}
            if fedpm and len(clients) >= 2 and all(c["names"] == clients[0]["names"] for c in clients):
                entry.update(mask_agreement(clients[0]["names"], [c["arrays"] for c in clients]))
            for c in clients:
                del c["arrays"]
            aggregated = super().aggregate_fit(server_round, results, failures)
            if aggregated[0] is not None:
                entry["bytes_to_each_client"] = sum(len(t) for t in aggregated[0].tensors)
            if fedpm and aggregated[0] is not None:
                thetas, names = self.decoded(parameters_to_ndarrays(aggregated[0]))
                entry["server_digest"] = digest(thetas)
                entry.update(scores_sent_back(thetas, names))
                sent.clear()
                sent.update(zip(names, thetas))
            record.append(entry)
            out.write_text(json.dumps(record, indent=1))
            return aggregated

    def mask_agreement(names: list[str], masks: list[list[np.ndarray]]) -> dict[str, Any]:
        """How alike the clients' masks are (an element agrees where every client sent the same bit):
        over all elements, and over the elements whose score was finite at the start of the round
        (where each client samples; two independent clients agree there with probability p^2 +
        (1-p)^2, about 0.5-0.6 here; clients drawing the same uniforms agree almost everywhere)."""
        first = masks[0]
        equal = np.concatenate([
            np.logical_and.reduce([other[i] == x for other in masks[1:]]).ravel() for i, x in enumerate(first)
        ])  # fmt: skip
        sampled = np.concatenate([
            held_scores_finite.get(n, np.ones(x.size, dtype=bool)).ravel() for n, x in zip(names, first)
        ])  # fmt: skip
        return {
            "masks_identical": bool(equal.all()),
            "masks_agree_fraction": float(equal.mean()),
            "sampled_elements": int(sampled.sum()),
            "masks_agree_fraction_where_sampled": float(equal[sampled].mean()) if sampled.any() else None,
        }

    def scores_sent_back(thetas: list[np.ndarray], names: list[str]) -> dict[str, Any]:
        """What the clients will hold as scores next round: FedPmExchanger.pull_parameters turns the
        aggregated Beta posterior means theta into scores with fl4health's sigmoid_inverse, which is
        -inf / +inf where theta is 0 / 1 (where every client sent the same mask bit, and the priors
        were reset: FedPmServer's default reset_frequency=1)."""
        finite = [torch.isfinite(sigmoid_inverse(torch.tensor(t))).numpy() for t in thetas]
        held_scores_finite.clear()
        held_scores_finite.update(zip(names, finite))
        flat = np.concatenate([f.ravel() for f in finite])
        return {
            "scores_sent_back": int(flat.size),
            "nonfinite_score_fraction": float(1.0 - flat.mean()),
            "nonfinite_score_fraction_per_array": {n: float(1.0 - f.mean()) for n, f in zip(names, finite)},
        }

    # FedPM: the Bernoulli parameters theta the server sent in its last reply (none before round 2),
    # which the clients hold when they sample: the prior an entropy coder of the masks may use.
    sent: dict[str, np.ndarray] = {}

    def prior_cost(names: list[str], masks: list[np.ndarray]) -> dict[str, Any]:
        """What an ideal entropy coder would send for these masks, coding each bit with the theta the
        server sent for its layer, quantized to PRIOR_BITS bits and kept off 0 and 1 (a bit that
        contradicts a certain prior costs PRIOR_BITS bits, it never fails): the sum of -log2 q(bit),
        and a layer without a usable theta (round 1: the initial model's scores) or whose coding
        would exceed one bit an element sent as a bitmap. Also how many elements had a certain
        prior (theta 0 or 1) and how many of those bits contradicted it."""
        one = 1 << PRIOR_BITS
        bits, certain, contradicted, with_prior = 0.0, 0, 0, 0
        for name, m in zip(names, masks):
            theta = sent.get(name)
            usable = (
                theta is not None and theta.shape == m.shape and theta.dtype.kind == "f"
                and bool(((theta >= 0) & (theta <= 1)).all())
            )  # fmt: skip
            if not usable:
                bits += m.size
                continue
            q1 = np.clip(np.floor(theta * one + 0.5), 1, one - 1) / one
            bits += min(float(m.size), float(-np.log2(np.where(m == 1, q1, 1.0 - q1)).sum()))
            sure = (theta == 0) | (theta == 1)
            certain += int(sure.sum())
            contradicted += int((sure & (m != theta)).sum())
            with_prior += m.size
        return {
            "mask_elements": int(sum(m.size for m in masks)),
            "ideal_coded_bits": bits,
            "elements_with_prior": with_prior,
            "prior_certain": certain,
            "prior_contradicted": contradicted,
        }

    strategy = Recording(**kwargs)
    if mode.startswith("fedpm"):
        server: Any = FedPmServer(client_manager=SimpleClientManager(), fl_config={}, strategy=strategy)
    else:
        server = FlServer(client_manager=SimpleClientManager(), fl_config={}, strategy=strategy)
    out.write_text(json.dumps(record))
    fl.server.start_server(
        server=server,
        server_address=f"127.0.0.1:{port}",
        config=fl.server.ServerConfig(num_rounds=rounds, round_timeout=240),
    )


# ------------------------------------------------------------------------------------------ driver

_PORTS_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that nobody listens on, never handed out twice by this process. Drawn at random
    below the kernel's ephemeral range, so that no outgoing connection (our clients' included) is
    given it between this check and the server's bind; several federations started at once (other
    test runs on the machine) draw different ports. A port lost anyway makes flwr's server exit at
    start-up ('already in use'), and run_federation then retries with another one."""
    rng = random.SystemRandom()
    high = _ephemeral_low()
    low = 20000 if high > 21000 else 1024
    for _ in range(500):
        port = rng.randrange(low, high)
        if port in _PORTS_HANDED_OUT:
            continue
        with socket.socket() as s:  # no SO_REUSEADDR: fails while anything holds the port
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port found in [{low}, {high})")


def accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def server_listens(proc: subprocess.Popen, port: int) -> bool:
    """The port accepts connections, and (where psutil can tell, as on Linux) it is the server process
    itself that listens there: a port that some other process took after free_port() must not pass
    for our server while that one exits with 'already in use'."""
    if not accepts_connections(port):
        return False
    try:
        import psutil
    except ImportError:
        return True
    try:
        p = psutil.Process(proc.pid)
        conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def explain(res: dict[str, Any]) -> str:
    """Everything needed to understand a failed federation: what went wrong, exit codes, and the full
    server and client logs (meant for assertion messages)."""
    who = "layersel_ext" if res.get("patched") else "fl4health"
    rounds = [r["round"] for r in res.get("record", [])]
    lines = [
        f"federation {res.get('mode')} ({who}) on port {res.get('port')}: {res.get('error') or 'no harness error'}",
        f"exit codes (server, client0, ...): {res.get('returncodes')}; killed by the harness: "
        + f"{res.get('killed') or 'none'}; {res.get('seconds', 0):.1f} s; rounds recorded: {rounds}",
    ]
    names = ["server", *(f"client{i}" for i in range(res.get("clients", 2)))]
    for name, log in zip(names, res.get("logs", [])):
        lines += [f"----- {name} log -----", log.rstrip() or "(empty)"]
    return "\n".join(lines)


def run_federation(
    mode: str,
    patched: bool,
    rounds: int = 3,
    wire: str = "fl4health",
    timeout: float = 480.0,
    connect_timeout: float = 180.0,
    grace: float = 45.0,
    clients: int = 2,
) -> dict[str, Any]:
    """One federation (server + `clients` clients, separate processes on loopback). Returns what the
    server received each round ('record'), the processes' exit codes (server, client0, ...), their
    full logs, what the harness had to kill and why ('killed', 'error'), and the wall time.

    Bounded in time, never by a fixed sleep: the clients start with the server (their imports and
    set-up overlap its own) and connect once the server listens on its port and accepts connections
    (polled by the harness, which then hands them the port in a file; flwr's client does not retry a
    refused connection); it fails at once if the server exits first, or after `connect_timeout`
    seconds. The whole federation has
    `timeout` seconds; once the clients have all exited the server gets `grace` seconds to finish,
    none when a client failed (it cannot finish without it), and the other way round (a server that
    fails waits forever for clients, clients that lose their server may too); then whatever still
    runs is killed and reported. No process outlives the call.
    """
    t_start = time.monotonic()
    deadline = t_start + timeout
    patch = wire if patched else ""  # the wire patch() gets in the server and client processes; "": not patched
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LAYERSEL_PATCH_FL4HEALTH": patch}
    cmd = [sys.executable, "-m", "examples.federated_rounds"]
    res: dict[str, Any] = {
        "mode": mode, "patched": patched, "wire": wire, "clients": clients, "error": None, "killed": [],
    }  # fmt: skip
    names = ["server", *(f"client{i}" for i in range(clients))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        port_file = Path(tmp) / "port"
        procs: list[subprocess.Popen] = []  # in the order of names
        logs: list[Any] = []

        def start(i: int, role_args: list[str]) -> subprocess.Popen:
            log = open(Path(tmp) / f"{names[i]}.log", "w+")  # noqa: SIM115
            p = subprocess.Popen([*cmd, *role_args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            if i < len(procs):  # a server started again on another port
                procs[i], logs[i] = p, log
            else:
                procs.append(p)
                logs.append(log)
            return p

        def read_log(i: int) -> str:
            logs[i].seek(0)
            return str(logs[i].read())

        def kill(i: int, why: str) -> None:
            if procs[i].poll() is None:
                procs[i].kill()
                procs[i].wait()
                res["killed"].append(names[i])
                res["error"] = res["error"] or why

        try:
            # The server, on a fresh port; retried on another port if that one was taken after all.
            connect_deadline = min(deadline, time.monotonic() + connect_timeout)
            for attempt in range(3):
                if procs:
                    procs[0].wait()
                    logs[0].close()
                port = free_port()
                server = start(0, ["--role", "server", "--mode", mode, "--port", str(port), "--rounds", str(rounds),
                                   "--out", str(out), "--clients", str(clients)])  # fmt: skip
                for i in range(1, 1 + clients):
                    if i == len(procs):
                        start(i, ["--role", "client", "--mode", mode, "--index", str(i - 1), "--port-file",
                                  str(port_file), "--wait", str(connect_timeout)])  # fmt: skip
                while server.poll() is None and time.monotonic() < connect_deadline:
                    if server_listens(server, port):
                        break
                    time.sleep(0.1)
                if server.poll() is not None and "already in use" in read_log(0) and attempt < 2:
                    continue
                break
            res["port"] = port
            if server.poll() is not None:
                res["error"] = f"the server exited (code {server.returncode}) before listening on port {port}"
            elif not server_listens(server, port):
                kill(0, f"the server did not listen on port {port} within {connect_deadline - t_start:.0f} s")
            else:
                res["server_ready_s"] = round(time.monotonic() - t_start, 1)
                written = port_file.with_suffix(".tmp")
                written.write_text(str(port))
                written.replace(port_file)  # whole, or not there at all, when a client looks
            if "server_ready_s" not in res:  # the clients would wait for a port that never comes
                for i in range(1, len(procs)):
                    kill(i, res["error"] or "the server did not start")

            done_at: dict[str, float] = {}
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                running = [i for i, p in enumerate(procs) if p.poll() is None]
                if now > deadline:
                    for i in running:
                        kill(i, f"still running after the {timeout:.0f} s deadline: {[names[j] for j in running]}")
                elif running == [0] and len(procs) == 1 + clients and any(p.returncode != 0 for p in procs[1:]):
                    kill(
                        0, f"a client failed (exit codes {[p.returncode for p in procs[1:]]}): the server cannot finish"
                    )
                elif running == [0] and len(procs) == 1 + clients and now - done_at.setdefault("clients", now) > grace:
                    kill(0, f"the server was still running {grace:.0f} s after every client exited")
                elif 0 not in running and now - done_at.setdefault("server", now) > grace:
                    for i in running:
                        kill(i, f"a client was still running {grace:.0f} s after the server exited")
                time.sleep(0.2)
        finally:  # nothing outlives the call, whatever happened above
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        res["logs"] = [read_log(i) for i in range(len(logs))]
        for log in logs:
            log.close()
        try:
            res["record"] = json.loads(out.read_text() or "[]") if out.exists() else []
        except ValueError as exc:  # a server killed while writing it
            res["record"] = []
            res["error"] = res["error"] or f"unreadable record ({exc})"
    res["returncodes"] = [p.returncode for p in procs]
    res["seconds"] = round(time.monotonic() - t_start, 1)
    return res


def completed(res: dict[str, Any]) -> bool:
    """The federation ran to its end: no harness error, every process exited with 0."""
    return not res["error"] and res["returncodes"] == [0] * (1 + res.get("clients", 2))


# ------------------------------------------------------------------------------------------ wire comparison

UNPATCHED = "fl4health (unpatched)"


def run_wire_comparison(
    mode: str, clients: int = 2, rounds: int = 5, wires: tuple[str, ...] | None = None, timeout: float = 600.0
) -> dict[str, dict[str, Any]]:
    """The same FedPM federation once with fl4health alone (UNPATCHED: its bytes are the reference)
    and once per wire of ``layersel_ext.fl4health.WIRES`` (``patch(wire=w)`` in every process).
    The patched runs sample the same masks whatever the wire (every client draws its mask key from
    torch's generator, seeded alike, and trains alike), so what reaches the server and what it sends
    back must be bitwise equal; fl4health alone samples with scipy, other masks. Returns
    ``{label: run_federation's result}``, the unpatched run first."""
    from layersel_ext.fl4health import WIRES

    runs = {UNPATCHED: run_federation(mode, False, rounds, timeout=timeout, clients=clients)}
    for wire in wires or WIRES:
        runs[wire] = run_federation(mode, True, rounds, wire=wire, timeout=timeout, clients=clients)
    return runs


def summarize_wires(runs: dict[str, dict[str, Any]], mode: str, clients: int, rounds: int) -> dict[str, Any]:
    """Per round and per run: the bytes each client sent (the serialized Flower FitRes parameters),
    bits per mask element (all of a message's bytes, framing included, over its mask elements), the
    ratio to fl4health alone, and the digest of the aggregated model the server sent back (its theta
    arrays); whether those digests, and the arrays every client sent (decoded), are equal across the
    patched wires; and what decides how well masks can be coded: the share of scores the clients
    held as +-inf (theta 0 or 1), the ideal coded size given the theta the server last sent
    (``prior_cost``), the clients' agreement and training loss."""
    wires = [label for label in runs if label != UNPATCHED]
    by_round = {label: {r["round"]: r for r in res["record"]} for label, res in runs.items()}
    elements = next(
        (c["mask_elements"] for res in runs.values() for r in res["record"] for c in r["clients"]), 0
    )  # fmt: skip
    table = []
    for rnd in range(1, rounds + 1):
        row: dict[str, Any] = {"round": rnd, "runs": {}}
        reference = by_round[UNPATCHED].get(rnd)
        ref_bytes = _mean([c["bytes_sent"] for c in reference["clients"]]) if reference else None
        for label in runs:
            r = by_round[label].get(rnd)
            if r is None:
                continue
            sent = [c["bytes_sent"] for c in r["clients"]]
            row["runs"][label] = {
                "bytes_per_client": sent,
                "bytes_to_each_client": r.get("bytes_to_each_client"),
                "bpp": 8 * _mean(sent) / elements if elements else None,
                "x_fewer_than_fl4health": ref_bytes / _mean(sent) if ref_bytes else None,
                "server_digest": r.get("server_digest"),
            }
        present = [by_round[w][rnd] for w in wires if rnd in by_round[w]]
        row["aggregates_identical"] = len(present) == len(wires) > 0 and (
            len({r.get("server_digest") for r in present}) == 1 and present[0].get("server_digest") is not None
        )
        row["client_messages_identical"] = len(present) == len(wires) > 0 and (
            len({tuple(c["digest"] for c in r["clients"]) for r in present}) == 1
        )
        if present:
            first = present[0]
            row["nonfinite_scores_held"] = by_round[wires[0]].get(rnd - 1, {}).get("nonfinite_score_fraction", 0.0)
            row["ideal_coded_bpp"] = _mean([c["ideal_coded_bits"] for c in first["clients"]]) / elements
            row["prior_contradicted"] = sum(c["prior_contradicted"] for c in first["clients"])
            row["masks_agree_where_sampled"] = first.get("masks_agree_fraction_where_sampled")
            row["train_loss"] = _mean([c.get("train_loss", float("nan")) for c in first["clients"]])
        table.append(row)
    return {
        "mode": mode,
        "clients": clients,
        "rounds": rounds,
        "wires": wires,
        "mask_elements": elements,
        "prior_bits": PRIOR_BITS,
        "runs": {label: _run_outcome(res) for label, res in runs.items()},
        "all_completed": all(completed(res) for res in runs.values()),
        "aggregates_identical_every_round": all(row["aggregates_identical"] for row in table),
        "table": table,
    }


def _run_outcome(res: dict[str, Any]) -> dict[str, Any]:
    rounds = [r["round"] for r in res["record"]]
    return {k: res[k] for k in ("error", "returncodes", "seconds")} | {"completed": completed(res), "rounds": rounds}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def wire_table(summary: dict[str, Any]) -> str:
    """One model and client count of ``summarize_wires`` as a markdown table: a row per round; per
    run the bytes each client sent (mean), bits per mask element, and how many times fewer bytes than
    fl4health alone; whether the aggregated models are bitwise equal across the patched wires; the
    scores held as +-inf at the start of the round, the ideal coded size and the clients' mean
    training loss."""
    labels = list(summary["runs"])
    head = ["round"]
    for label in labels:
        name = "fl4health" if label == UNPATCHED else f"`{label}`"
        head += [f"{name} bytes/client"] + ([] if label == UNPATCHED else [f"{name} bpp", f"{name} ×"])
    head += ["models equal", "±inf scores held", f"ideal bpp ({summary['prior_bits']}-bit θ)", "train loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["table"]:
        cells = [str(row["round"])]
        for label in labels:
            run = row["runs"].get(label)
            n = 1 if label == UNPATCHED else 3
            if run is None:
                cells += ["–"] * n
                continue
            cells.append(f"{_mean(run['bytes_per_client']):,.0f}")
            if label != UNPATCHED:
                ratio = run["x_fewer_than_fl4health"]
                cells += [f"{run['bpp']:.3f}", f"{ratio:.0f}×" if ratio else "–"]
        cells += [
            "yes" if row["aggregates_identical"] else "NO",
            f"{row['nonfinite_scores_held']:.1%}" if "nonfinite_scores_held" in row else "–",
            f"{row['ideal_coded_bpp']:.3f}" if "ideal_coded_bpp" in row else "–",
            f"{row['train_loss']:.3f}" if "train_loss" in row else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("server", "client"), default=None)
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, default=None, help="a client: wait for the server's port in this file")
    p.add_argument("--wait", type=float, default=180.0, help="a client: seconds to wait for --port-file")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=2, help="clients per federation (the server waits for all)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--verbose", action="store_true", help="also print the logs of expected failures")
    p.add_argument(
        "--compare-wires",
        action="store_true",
        help=f"the FedPM wire comparison (default modes: {', '.join(WIRE_MODES)})",
    )
    args = p.parse_args(argv)
    if args.role is not None:
        import logging

        logging.getLogger("flwr").setLevel(logging.WARNING)
        wire = os.environ.get("LAYERSEL_PATCH_FL4HEALTH", "")
        if wire:
            import layersel_ext.fl4health

            layersel_ext.fl4health.patch(wire=wire)
        if args.role == "server":
            run_server(args.mode, args.port, args.rounds, args.out, args.clients)
        else:
            run_client(args.mode, args.index, args.port, args.port_file, args.wait)
        return 0
    if args.compare_wires:
        failed = 0
        for mode in [args.mode] if args.mode else WIRE_MODES:
            runs = run_wire_comparison(mode, args.clients, args.rounds)
            summary = summarize_wires(runs, mode, args.clients, args.rounds)
            print(wire_table(summary))
            for res in runs.values():
                if not completed(res):
                    print(explain(res))
            failed += not summary["all_completed"] or not summary["aggregates_identical_every_round"]
        return 1 if failed else 0
    from layersel_ext.fl4health import WIRES

    failed, summary_lines = 0, []
    for mode in [args.mode] if args.mode else MODES:
        compact = mode.startswith("fedpm") or mode in SPARSITY
        runs = [(False, "fl4health")] + [(True, w) for w in WIRES if compact or w == "fl4health"]
        reference: dict[str, Any] = {}
        for patched, wire in runs:
            res = run_federation(mode, patched, args.rounds, wire=wire, clients=args.clients)
            who = ("layersel_ext" + (f" wire={wire}" if wire != "fl4health" else "")) if patched else "fl4health"
            rounds = [r["round"] for r in res["record"]]
            print(f"{mode} / {who}: rounds reached {rounds}, exit codes {res['returncodes']} ({res['seconds']:.0f} s)")
            print_rounds(res["record"])
            if not patched:
                reference = res
            summary_lines += summary_rows(mode, who, res, reference if patched else None)
            ok = completed(res)
            expected = EXPECTED_FAILURES.get((mode, patched))
            if not ok and expected:
                print(f"  EXPECTED failure of fl4health alone: {expected} (logs: --verbose)")
                if args.verbose:
                    print(explain(res))
            elif not ok:
                print(explain(res))
                failed += 1
    print_summary(summary_lines)
    return 1 if failed else 0


# Runs that fail by fl4health's own design; the example shows them, the summary labels them.
EXPECTED_FAILURES = {
    ("fedpm_linear_n_1", False): "scipy drops the leading size-1 dims of MaskedLinear(8, 1)'s masks, "
    "so the clients' load_state_dict fails in round 2",
}


def print_rounds(record: list[dict[str, Any]]) -> None:
    for r in record:
        for c in r["clients"]:
            print(
                f"  round {r['round']} client {c['client']}: {len(c['names'])} arrays {c['names'][:3]}..., "
                f"digest {c['digest']}, {c['bytes_sent']:,} bytes sent"
            )
        if "bytes_to_each_client" in r:
            print(f"  round {r['round']} server: {r['bytes_to_each_client']:,} bytes sent to each client")
        if "masks_agree_fraction" in r:
            where = r["masks_agree_fraction_where_sampled"]
            print(
                f"  round {r['round']} masks: identical across clients: {r['masks_identical']}, agree on "
                f"{r['masks_agree_fraction']:.1%} of elements"
                + (f" ({where:.1%} of the {r['sampled_elements']} sampled)" if where is not None else "")
            )
        if "nonfinite_score_fraction" in r:
            print(
                f"  round {r['round']} server: of the {r['scores_sent_back']} scores sent back, "
                f"{r['nonfinite_score_fraction']:.1%} are +-inf"
            )


def summary_rows(mode: str, who: str, res: dict[str, Any], reference: dict[str, Any] | None) -> list[list[str]]:
    """One row per client: did the run finish, are its arrays equal to fl4health's run (the same
    mode unpatched; FedPM masks are random, so not comparable), and the bytes it sent in all."""
    ok = completed(res)
    status = "ok" if ok else ("expected failure" if EXPECTED_FAILURES.get((mode, res["patched"])) else "FAILED")
    ref = {(r["round"], c["client"]): c["digest"] for r in (reference or {}).get("record", []) for c in r["clients"]}
    rows = []
    for client in range(res.get("clients", 2)):
        sent = [(r["round"], c) for r in res["record"] for c in r["clients"] if c["client"] == client]
        if reference is None or mode.startswith("fedpm"):
            equal = "-"
        else:
            equal = "yes" if sent and all(ref.get((rnd, client)) == c["digest"] for rnd, c in sent) else "NO"
        rows.append(
            [mode, who, str(client), status, str(len(sent)), equal, f"{sum(c['bytes_sent'] for _, c in sent):,}"]
        )
    return rows


def print_summary(rows: list[list[str]]) -> None:
    head = ["mode", "run", "client", "result", "rounds sent", "equal to fl4health", "bytes sent"]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    print(
        "\nSummary (equal to fl4health: every round's arrays bitwise equal to the unpatched run's; "
        "'-' for FedPM, whose masks are random, and for fl4health itself)"
    )
    for line in [head, ["-" * w for w in widths], *rows]:
        print("  " + "  ".join(x.ljust(w) for x, w in zip(line, widths)))


if __name__ == "__main__":
    sys.exit(main())
