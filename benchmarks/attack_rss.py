"""Peak memory of a real ``stbir-infer serve`` under issue 26's request attacks, all at once.

Starts ``python -m stbir_infer serve`` on a free loopback port over EXPORT and INDEX (the index
should hold a large image, e.g. a 7000 x 7000 16-bit PNG, for the thumbnail attack), then for
``--seconds`` runs together: 8 clients posting 40,000-part multipart bodies, 8 clients asking for
thumbnails of every image at changing sizes, 8 clients querying with a 190 x 263,000 16-bit PNG
sketch, 200 slow-header sockets (``benchmarks/slowloris.py``'s), and one normal client whose
latencies are reported. Reported: the server's peak RSS (VmHWM), its RSS before the attacks, the
statuses seen, and the normal client's max latency.

    python benchmarks/attack_rss.py --model EXPORT --index INDEX [--seconds 30]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return -1


def _request(port, method, target, body=None, headers=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers={"Host": f"127.0.0.1:{port}",
                                                         **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return -1
    finally:
        conn.close()


def run(model: str, index: str, seconds: float = 30.0) -> dict:
    import fuzz
    import slowloris

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stbir_infer", "serve", "--model", model,
                             "--index", index, "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if _request(port, "GET", "/api/health", timeout=2) == 200:
            break
        time.sleep(0.1)
    before = _vm(proc.pid, "VmRSS")
    part = b'--xyz\r\nContent-Disposition: form-data; name="text"\r\n\r\na\r\n'
    many_parts = part * 40_000 + b"--xyz--\r\n"
    thin = fuzz.png_bomb(190, 263_000, color_type=0, bit_depth=16)
    thin_body = (b'--xyz\r\nContent-Disposition: form-data; name="sketch"; filename="t.png"\r\n'
                 b"Content-Type: image/png\r\n\r\n" + thin + b"\r\n--xyz--\r\n")
    statuses: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    latencies: list[float] = []

    def loop(fn):
        i = 0
        while not stop.is_set():
            status = fn(i)
            i += 1
            with lock:
                statuses[status] += 1

    mp = {"Content-Type": "multipart/form-data; boundary=xyz"}
    attacks = [lambda i: _request(port, "POST", "/api/query", many_parts, mp)] * 8
    attacks += [lambda i: _request(port, "GET", f"/api/image/{i % 4}?size={64 + i % 900}")] * 8
    attacks += [lambda i: _request(port, "POST", "/api/query", thin_body, mp)] * 8

    def normal(i):
        t0 = time.perf_counter()
        status = _request(port, "POST", "/api/query", json.dumps({"text": "a red star"}).encode(),
                          {"Content-Type": "application/json"})
        latencies.append(time.perf_counter() - t0)
        return status

    threads = [threading.Thread(target=loop, args=(fn,), daemon=True) for fn in attacks + [normal]]
    counts = {"opened": 0, "closed_by_server": 0}
    threads.append(threading.Thread(target=slowloris._slow_clients,
                                    args=(("127.0.0.1", port), 200, 1.0, stop, counts), daemon=True))
    for t in threads:
        t.start()
    time.sleep(seconds)
    peak = _vm(proc.pid, "VmHWM")
    stop.set()
    for t in threads:
        t.join(30)
    proc.terminate()
    proc.wait(30)
    return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "normal_queries": len(latencies),
            "normal_max_s": round(max(latencies), 3) if latencies else None,
            "slow_closed_by_server": counts["closed_by_server"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    print(json.dumps(run(args.model, args.index, args.seconds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
