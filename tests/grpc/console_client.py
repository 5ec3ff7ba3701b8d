"""A console client in Python, its code generated from proto/ at test time: the console API
is language-neutral. Lists units, discovers the service by reflection, opens a session,
then lists the unit's recordings and fetches two of its files (Evidence service).

Usage: console_client.py HOST:PORT TOKEN UNIT   (prints JSON; exits non-zero on failure)
"""
import json
import os
import queue
import subprocess
import sys
import tempfile

import hashlib
import time

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def generate(out):
    protos = os.path.join(ROOT, "proto", "proto")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{protos}", f"--python_out={out}",
           f"--grpc_python_out={out}", "tianwang/v1/media.proto", "tianwang/v1/console.proto",
           "tianwang/v1/evidence.proto"]
    subprocess.run(cmd, check=True)
    for d in ("tianwang", "tianwang/v1"):
        open(os.path.join(out, d, "__init__.py"), "a").close()
    sys.path.insert(0, out)


def main():
    addr, token, unit = sys.argv[1:4]
    with tempfile.TemporaryDirectory() as out:
        generate(out)
        from tianwang.v1 import console_pb2 as pb, console_pb2_grpc as rpc

        channel = grpc.insecure_channel(addr)
        grpc.channel_ready_future(channel).result(timeout=10)
        report = {}

        # Reflection: a generic tool finds the service without our .proto files.
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflect.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")])))
        report["services"] = sorted(s.name for s in answer.list_services_response.service)

        stub = rpc.ConsoleStub(channel)
        auth = [("authorization", f"Bearer {token}")]
        try:
            stub.ListUnits(pb.ListUnitsRequest(), timeout=10)
            report["unauthenticated_list"] = "allowed"
        except grpc.RpcError as e:
            report["unauthenticated_list"] = e.code().name
        units = stub.ListUnits(pb.ListUnitsRequest(), metadata=auth, timeout=10)
        report["units"] = [{"unit": u.unit_id, "online": u.online,
                            "tracks": [t.name for t in u.tracks]} for u in units.units]

        # A session: authenticated by metadata; a ping, then a tile and the hub's offer.
        requests = queue.Queue()
        requests.put(pb.SessionRequest(ping=pb.Ping(nonce=7)))
        requests.put(pb.SessionRequest(add_tile=pb.AddTile(tile_id="py", unit_id=unit)))

        def outgoing():
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        events = stub.Session(outgoing(), metadata=auth, timeout=20)
        seen = []
        for event in events:
            kind = event.WhichOneof("kind")
            seen.append(kind)
            if kind == "ready":
                report["user"] = event.ready.user
                report["role"] = event.ready.role
            elif kind == "pong":
                report["pong"] = event.pong.nonce
            elif kind == "offer":
                report["offer_is_sdp"] = event.offer.sdp.startswith("v=0")
                report["offer_has_h264"] = "H264/90000" in event.offer.sdp
                report["offer_revision"] = event.offer.revision
                break
        requests.put(None)
        events.cancel()
        report["events"] = seen
        report["evidence"] = evidence(channel, auth, unit)
        print(json.dumps(report))


def evidence(channel, auth, unit):
    """The unit's recordings: listed, then the init segment and the first media segment
    fetched, each checked against the SHA-256 the listing gives."""
    from tianwang.v1 import evidence_pb2 as pb, evidence_pb2_grpc as rpc

    stub = rpc.EvidenceStub(channel)
    out = {}
    deadline = time.time() + 30
    while True:
        listing = stub.ListRecordings(pb.ListRecordingsRequest(unit=unit), metadata=auth, timeout=10)
        segs = [s for r in listing.recordings for s in r.segments]
        if segs or time.time() > deadline:
            break
        time.sleep(0.5)
    out["segments"] = len(segs)
    if not segs:
        return out
    rec = listing.recordings[0]
    out["codecs"] = rec.codecs
    init = stub.FetchSegment(pb.FetchSegmentRequest(url=rec.init_url), metadata=auth, timeout=10)
    out["init_ok"] = hashlib.sha256(init.data).hexdigest() == init.sha256
    first = stub.FetchSegment(pb.FetchSegmentRequest(url=segs[0].url), metadata=auth, timeout=10)
    out["segment_ok"] = (hashlib.sha256(first.data).hexdigest() == segs[0].sha256
                         and len(first.data) == segs[0].bytes)
    try:
        stub.FetchSegment(pb.FetchSegmentRequest(url="/recordings/../../etc/passwd"),
                          metadata=auth, timeout=10)
        out["outside"] = "served"
    except grpc.RpcError as e:
        out["outside"] = e.code().name
    return out


if __name__ == "__main__":
    main()
