"""Real federated rounds on loopback: a Flower server with fl4health's strategy and two fl4health
clients, once with fl4health's own selection functions and once with layersel_ext patched in.

    python -m examples.federated_rounds            # every mode, fl4health vs patched, a summary
    python -m examples.federated_rounds --mode fedpm_linear_n_1

Modes: layer_threshold, layer_percentage (DynamicLayerExchanger + FedAvgDynamicLayer),
sparse (SparseCooParameterExchanger + FedAvgSparseCooTensor), fedpm (masked CNN, FedPmServer +
FedPm), fedpm_linear_n_1 (a masked Linear(n, 1): fl4health's squeezed masks break it).
Server and clients are separate processes on 127.0.0.1, bounded in time; synthetic data.
What reached the server each round is recorded by the server process into a JSON file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("layer_threshold", "layer_percentage", "sparse", "fedpm", "fedpm_linear_n_1")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ models/data


def make_model(mode: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if mode == "fedpm_linear_n_1":
        from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

        return nn.Sequential(MaskedLinear(8, 1))
    if mode == "fedpm":
        from fl4health.model_bases.masked_layers.masked_conv import MaskedConv2d
        from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

        return nn.Sequential(MaskedConv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), MaskedLinear(4 * 6 * 6, 10))
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
        nn.Linear(16, 10),
    )  # fmt: skip


def make_loaders(index: int, mode: str) -> tuple[Any, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(100 + index)
    x = torch.randn(64, 1, 8, 8, generator=g)
    if mode == "fedpm_linear_n_1":
        x = torch.randn(64, 8, generator=g)
        y = (x.sum(1, keepdim=True) > 0).float()
    else:
        y = torch.randint(0, 10, (64,), generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16, shuffle=False), DataLoader(data, batch_size=32, shuffle=False)


# ------------------------------------------------------------------------------------------ client


def run_client(mode: str, index: int, port: int) -> None:
    import flwr as fl
    import torch
    from fl4health.clients.fedpm_client import FedPmClient
    from fl4health.clients.partial_weight_exchange_client import PartialWeightExchangeClient
    from fl4health.parameter_exchange import parameter_selection_criteria as criteria
    from fl4health.parameter_exchange.layer_exchanger import DynamicLayerExchanger
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger

    torch.manual_seed(index)
    regression = mode == "fedpm_linear_n_1"

    class Common:
        def get_data_loaders(self, config: Any) -> tuple[Any, Any]:
            return make_loaders(index, mode)

        def get_criterion(self, config: Any) -> Any:
            return torch.nn.BCEWithLogitsLoss() if regression else torch.nn.CrossEntropyLoss()

        def get_optimizer(self, config: Any) -> Any:
            return torch.optim.SGD(self.model.parameters(), lr=0.1)  # type: ignore[attr-defined]

        def get_model(self, config: Any) -> Any:
            return make_model(mode)

    class PartialClient(Common, PartialWeightExchangeClient):
        def get_parameter_exchanger(self, config: Any) -> Any:
            if mode == "sparse":
                return SparseCooParameterExchanger(0.1, criteria.largest_magnitude_change_scores)
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
    fl.client.start_client(server_address=f"127.0.0.1:{port}", client=client.to_client())
    client.shutdown()


# ------------------------------------------------------------------------------------------ server


def digest(arrays: list[Any]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def run_server(mode: str, port: int, rounds: int, out: Path) -> None:
    import flwr as fl
    from fl4health.servers.base_server import FlServer
    from fl4health.servers.fedpm_server import FedPmServer
    from fl4health.strategies.fedavg_dynamic_layer import FedAvgDynamicLayer
    from fl4health.strategies.fedavg_sparse_coo_tensor import FedAvgSparseCooTensor
    from fl4health.strategies.fedpm import FedPm
    from fl4health.utils.parameter_extraction import get_all_model_parameters
    from flwr.common import parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager

    def fit_config(current_server_round: int) -> dict[str, Any]:
        return {
            "local_steps": 2,
            "batch_size": 16,
            "current_server_round": current_server_round,
            "is_masked_model": True,
        }

    record: list[dict[str, Any]] = []
    kwargs = {
        "min_fit_clients": 2,
        "min_evaluate_clients": 2,
        "min_available_clients": 2,
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": fit_config,
        "initial_parameters": get_all_model_parameters(make_model(mode)),
    }
    if mode.startswith("fedpm"):
        strategy_cls: Any = FedPm
    elif mode == "sparse":
        strategy_cls = FedAvgSparseCooTensor
    else:
        strategy_cls = FedAvgDynamicLayer

    class Recording(strategy_cls):  # type: ignore[misc, valid-type]
        def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
            clients = []
            for _, fit_res in results:
                arrays = parameters_to_ndarrays(fit_res.parameters)
                names = arrays[-1].tolist()
                clients.append({
                    "names": names,
                    "digest": digest(arrays[:-1]),
                    "dtypes": [str(a.dtype) for a in arrays[:-1]],
                    "shapes": [list(a.shape) for a in arrays[:-1]],
                })  # fmt: skip
            clients.sort(key=lambda c: c["digest"])
            record.append({"round": server_round, "clients": clients, "failures": len(failures)})
            out.write_text(json.dumps(record, indent=1))
            return super().aggregate_fit(server_round, results, failures)

    strategy = Recording(**kwargs)
    if mode.startswith("fedpm"):
        server: Any = FedPmServer(client_manager=SimpleClientManager(), fl_config={}, strategy=strategy)
    else:
        server = FlServer(client_manager=SimpleClientManager(), fl_config={}, strategy=strategy)
    out.write_text(json.dumps(record))
    fl.server.start_server(
        server=server,
        server_address=f"127.0.0.1:{port}",
        config=fl.server.ServerConfig(num_rounds=rounds, round_timeout=60),
    )


# ------------------------------------------------------------------------------------------ driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_federation(mode: str, patched: bool, rounds: int = 3, timeout: float = 150.0) -> dict[str, Any]:
    """One federation (server + 2 clients, separate processes on loopback); returns what the server
    received each round, the processes' exit codes and the tail of their logs."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LAYERSEL_PATCH_FL4HEALTH": str(int(patched))}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        cmd = [sys.executable, "-m", "examples.federated_rounds"]
        logs = [open(Path(tmp) / f"{n}.log", "w+") for n in ("server", "client0", "client1")]  # noqa: SIM115
        procs = [subprocess.Popen([*cmd, "--role", "server", "--mode", mode, "--port", str(port), "--rounds",
                                   str(rounds), "--out", str(out)], cwd=ROOT, env=env, stdout=logs[0],
                                  stderr=subprocess.STDOUT)]  # fmt: skip
        time.sleep(2.0)
        for i in (0, 1):
            procs.append(
                subprocess.Popen(
                    [*cmd, "--role", "client", "--mode", mode, "--port", str(port), "--index", str(i)],
                    cwd=ROOT,
                    env=env,
                    stdout=logs[i + 1],
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.time() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:  # bounded: whatever still runs is stopped
            if p.poll() is None:
                p.kill()
                p.wait()
        tails = []
        for f in logs:
            f.seek(0)
            tails.append(f.read()[-3000:])
            f.close()
        record = json.loads(out.read_text()) if out.exists() else []
    return {"record": record, "returncodes": [p.returncode for p in procs], "logs": tails}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("server", "client"), default=None)
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.role is not None:
        import logging

        logging.getLogger("flwr").setLevel(logging.WARNING)
        if os.environ.get("LAYERSEL_PATCH_FL4HEALTH") == "1":
            import layersel_ext.fl4health

            layersel_ext.fl4health.patch()
        if args.role == "server":
            run_server(args.mode, args.port, args.rounds, args.out)
        else:
            run_client(args.mode, args.index, args.port)
        return 0
    for mode in [args.mode] if args.mode else MODES:
        for patched in (False, True):
            res = run_federation(mode, patched, args.rounds)
            rounds = [r["round"] for r in res["record"]]
            print(
                f"{mode:<18} {'layersel_ext' if patched else 'fl4health':<13} rounds reached: {rounds} "
                f"exit codes: {res['returncodes']}"
            )
            for r in res["record"]:
                for c in r["clients"]:
                    print(f"    round {r['round']}: {len(c['names'])} arrays {c['names'][:3]}... digest {c['digest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
