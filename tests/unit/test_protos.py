"""hitz.protos: up to date with protos/src, and wire-compatible with REAPI v2.

The expected bytes below are derived by hand from the spec's field numbers,
so a renumbered field, a wrong type or a changed encoding fails here before it
silently moves every action digest. A protobuf tag is (field_number << 3) |
wire_type, with wire type 0 = VARINT (ints, bools, enums) and 2 = LEN
(strings, bytes, messages: a varint length, then the payload).
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import duration_pb2
from google.rpc import code_pb2, status_pb2

from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from hitz.protos.build.bazel.semver import semver_pb2
from hitz.protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "protos" / "generate.py"
GENERATED = REPO / "protos" / "gen"
REQUEST_METADATA_KEY = "build.bazel.remote.execution.v2.requestmetadata-bin"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_modules_match_the_proto_sources(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    done = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    committed, fresh = _tree(GENERATED), _tree(out)
    stale = sorted(n for n in committed.keys() | fresh.keys() if committed.get(n) != fresh.get(n))
    assert not stale, (
        f"protos/gen/ is stale in {', '.join(stale)}: run `scripts/protos` and commit protos/gen/"
    )


# ---------------------------------------------------------------- exact bytes


def test_action_serializes_to_the_bytes_the_spec_numbers_give() -> None:
    action = re_pb2.Action(
        command_digest=re_pb2.Digest(hash="abc", size_bytes=3),
        input_root_digest=re_pb2.Digest(hash="def", size_bytes=300),
        timeout=duration_pb2.Duration(seconds=60),
        do_not_cache=True,
    )
    expected = bytes.fromhex(
        "0a07"  # field 1 command_digest: (1 << 3) | 2 = 0x0a, 7 bytes follow
        "0a03616263"  # . Digest field 1 hash: (1 << 3) | 2, 3 bytes, "abc"
        "1003"  # . Digest field 2 size_bytes: (2 << 3) | 0 = 0x10, 3
        "1208"  # field 2 input_root_digest: (2 << 3) | 2 = 0x12, 8 bytes follow
        "0a03646566"  # . hash "def"
        "10ac02"  # . size_bytes 300 = 0b10_0101100: 0x2c | 0x80 (more follows), then 0x02
        "3202"  # field 6 timeout: (6 << 3) | 2 = 0x32, 2 bytes follow
        "083c"  # . Duration field 1 seconds: (1 << 3) | 0, 60 = 0x3c
        "3801"  # field 7 do_not_cache: (7 << 3) | 0 = 0x38, true
    )
    assert action.SerializeToString(deterministic=True) == expected
    assert re_pb2.Action.FromString(expected) == action


def test_directory_serializes_files_then_directories_then_symlinks() -> None:
    # Filled in reverse field order: the encoding must still follow field numbers
    # ("Fields are serialized in tag order", REAPI Digest canonical form).
    digest = re_pb2.Digest(hash="h", size_bytes=1)
    directory = re_pb2.Directory()
    directory.symlinks.add(name="s", target="a")
    directory.directories.add(name="d", digest=digest)
    directory.files.add(name="a", digest=digest, is_executable=True)
    digest_bytes = "0a01681001"  # Digest: hash "h" (0a 01 68), size_bytes 1 (10 01)
    expected = bytes.fromhex(
        "0a0c"  # field 1 files: FileNode, 12 bytes
        "0a0161"  # . name "a"
        "1205" + digest_bytes +  # . field 2 digest, 5 bytes
        "2001"  # . field 4 is_executable: (4 << 3) | 0 = 0x20, true
        "120a"  # field 2 directories: DirectoryNode, 10 bytes
        "0a0164"  # . name "d"
        "1205" + digest_bytes +  # . digest
        "1a06"  # field 3 symlinks: (3 << 3) | 2 = 0x1a, SymlinkNode, 6 bytes
        "0a0173"  # . name "s"
        "120161"  # . field 2 target "a"
    )  # fmt: skip
    assert directory.SerializeToString(deterministic=True) == expected


def test_action_result_fields_are_encoded_in_field_number_order() -> None:
    result = re_pb2.ActionResult()
    result.output_symlinks.add(path="l", target="o")
    result.exit_code = 1
    result.output_files.add(path="o", digest=re_pb2.Digest(hash="h", size_bytes=1))
    expected = bytes.fromhex(
        "120a"  # field 2 output_files: OutputFile, 10 bytes
        "0a016f" "1205" "0a0168" "1001"  # . path "o", digest {hash "h", size_bytes 1}
        "2001"  # field 4 exit_code: (4 << 3) | 0, 1
        "6206"  # field 12 output_symlinks: (12 << 3) | 2 = 0x62, 6 bytes
        "0a016c" "12016f"  # . path "l", target "o"
    )  # fmt: skip
    assert result.SerializeToString(deterministic=True) == expected


def test_command_environment_variables_keep_the_order_given() -> None:
    # protobuf never reorders a repeated field: the spec's "sorted by name" rule
    # is the caller's job, and this order is what gets hashed.
    command = re_pb2.Command()
    command.environment_variables.add(name="PATH", value="/bin")
    command.environment_variables.add(name="A", value="1")
    expected = bytes.fromhex(
        "120c"  # field 2 environment_variables, 12 bytes
        "0a0450415448" "12042f62696e"  # . name "PATH", value "/bin"
        "1206"  # field 2 again, 6 bytes
        "0a0141" "120131"  # . name "A", value "1"
    )  # fmt: skip
    data = command.SerializeToString(deterministic=True)
    assert data == expected
    decoded = re_pb2.Command.FromString(data)
    assert [(v.name, v.value) for v in decoded.environment_variables] == [
        ("PATH", "/bin"),
        ("A", "1"),
    ]


def test_digest_round_trips() -> None:
    blob = b"hello"
    digest = re_pb2.Digest(hash=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob))
    decoded = re_pb2.Digest.FromString(digest.SerializeToString(deterministic=True))
    assert decoded == digest
    assert decoded.hash == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert decoded.size_bytes == 5


# ---------------------------------------------------------------- names and numbers

# The spec's numbers for the fields hitz relies on; a wrong one changes the wire.
SPEC_FIELD_NUMBERS = [
    (re_pb2.Action, "command_digest", 1),
    (re_pb2.Action, "input_root_digest", 2),
    (re_pb2.Action, "timeout", 6),
    (re_pb2.Action, "do_not_cache", 7),
    (re_pb2.Action, "salt", 9),
    (re_pb2.Action, "platform", 10),
    (re_pb2.Command, "arguments", 1),
    (re_pb2.Command, "output_files", 3),
    (re_pb2.Command, "output_directories", 4),
    (re_pb2.Command, "platform", 5),
    (re_pb2.Command, "working_directory", 6),
    (re_pb2.Command, "output_paths", 7),
    (re_pb2.Command, "output_node_properties", 8),
    (re_pb2.Command, "output_directory_format", 9),
    (re_pb2.Directory, "node_properties", 5),
    (re_pb2.FileNode, "is_executable", 4),
    (re_pb2.FileNode, "node_properties", 6),
    (re_pb2.SymlinkNode, "node_properties", 4),
    (re_pb2.NodeProperties, "unix_mode", 3),
    (re_pb2.ActionResult, "output_files", 2),
    (re_pb2.ActionResult, "output_directories", 3),
    (re_pb2.ActionResult, "exit_code", 4),
    (re_pb2.ActionResult, "stdout_raw", 5),
    (re_pb2.ActionResult, "stdout_digest", 6),
    (re_pb2.ActionResult, "stderr_raw", 7),
    (re_pb2.ActionResult, "stderr_digest", 8),
    (re_pb2.ActionResult, "execution_metadata", 9),
    (re_pb2.ActionResult, "output_file_symlinks", 10),
    (re_pb2.ActionResult, "output_directory_symlinks", 11),
    (re_pb2.ActionResult, "output_symlinks", 12),
    (re_pb2.OutputFile, "contents", 5),
    (re_pb2.OutputFile, "node_properties", 7),
    (re_pb2.OutputDirectory, "tree_digest", 3),
    (re_pb2.OutputDirectory, "root_directory_digest", 5),
    (re_pb2.ExecutedActionMetadata, "auxiliary_metadata", 11),
    (re_pb2.ExecutedActionMetadata, "virtual_execution_duration", 12),
    (re_pb2.ExecuteRequest, "skip_cache_lookup", 3),
    (re_pb2.ExecuteRequest, "action_digest", 6),
    (re_pb2.ExecuteRequest, "digest_function", 9),
    (re_pb2.ExecuteResponse, "server_logs", 4),
    (re_pb2.GetActionResultRequest, "digest_function", 6),
    (re_pb2.UpdateActionResultRequest, "digest_function", 5),
    (re_pb2.FindMissingBlobsRequest, "digest_function", 3),
    (re_pb2.FindMissingBlobsResponse, "missing_blob_digests", 2),
    (re_pb2.BatchUpdateBlobsRequest, "digest_function", 5),
    (re_pb2.BatchUpdateBlobsRequest.Request, "compressor", 3),
    (re_pb2.BatchReadBlobsRequest, "acceptable_compressors", 3),
    (re_pb2.BatchReadBlobsRequest, "digest_function", 4),
    (re_pb2.BatchReadBlobsResponse.Response, "status", 3),
    (re_pb2.BatchReadBlobsResponse.Response, "compressor", 4),
    (re_pb2.GetTreeRequest, "digest_function", 5),
    (re_pb2.CacheCapabilities, "max_batch_total_size_bytes", 4),
    (re_pb2.CacheCapabilities, "symlink_absolute_path_strategy", 5),
    (re_pb2.CacheCapabilities, "supported_compressors", 6),
    (re_pb2.CacheCapabilities, "supported_batch_update_compressors", 7),
    (re_pb2.ExecutionCapabilities, "digest_functions", 5),
    (re_pb2.ServerCapabilities, "high_api_version", 5),
    (re_pb2.RequestMetadata, "configuration_id", 7),
    (semver_pb2.SemVer, "prerelease", 4),
    (bytestream_pb2.ReadRequest, "read_limit", 3),
    (bytestream_pb2.ReadResponse, "data", 10),
    (bytestream_pb2.WriteRequest, "finish_write", 3),
    (bytestream_pb2.WriteRequest, "data", 10),
    (bytestream_pb2.QueryWriteStatusResponse, "complete", 2),
]


@pytest.mark.parametrize(
    ("message", "field", "number"),
    SPEC_FIELD_NUMBERS,
    ids=[f"{m.DESCRIPTOR.name}.{f}" for m, f, _ in SPEC_FIELD_NUMBERS],
)
def test_field_has_the_spec_number(message: type, field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_enums_have_the_spec_values() -> None:
    assert dict(re_pb2.Compressor.Value.items()) == {
        "IDENTITY": 0, "ZSTD": 1, "DEFLATE": 2, "BROTLI": 3,
    }  # fmt: skip
    assert dict(re_pb2.DigestFunction.Value.items()) == {
        "UNKNOWN": 0, "SHA256": 1, "SHA1": 2, "MD5": 3, "VSO": 4, "SHA384": 5,
        "SHA512": 6, "MURMUR3": 7, "SHA256TREE": 8, "BLAKE3": 9,
    }  # fmt: skip
    assert dict(re_pb2.ExecutionStage.Value.items()) == {
        "UNKNOWN": 0, "CACHE_CHECK": 1, "QUEUED": 2, "EXECUTING": 3, "COMPLETED": 4,
    }  # fmt: skip
    assert re_pb2.SymlinkAbsolutePathStrategy.ALLOWED == 2
    assert re_pb2.Command.TREE_AND_DIRECTORY == 2


def test_proto_packages_and_file_names_are_the_specs() -> None:
    # Package names are on the wire: in gRPC method paths and Any type URLs.
    assert re_pb2.DESCRIPTOR.package == "build.bazel.remote.execution.v2"
    assert re_pb2.DESCRIPTOR.name == "build/bazel/remote/execution/v2/remote_execution.proto"
    assert semver_pb2.DESCRIPTOR.package == "build.bazel.semver"
    assert bytestream_pb2.DESCRIPTOR.package == "google.bytestream"


SERVICES = {
    "build.bazel.remote.execution.v2.Execution": {
        "Execute": ("ExecuteRequest", "google.longrunning.Operation", False, True),
        "WaitExecution": ("WaitExecutionRequest", "google.longrunning.Operation", False, True),
    },
    "build.bazel.remote.execution.v2.ActionCache": {
        "GetActionResult": ("GetActionResultRequest", "ActionResult", False, False),
        "UpdateActionResult": ("UpdateActionResultRequest", "ActionResult", False, False),
    },
    "build.bazel.remote.execution.v2.ContentAddressableStorage": {
        "FindMissingBlobs": ("FindMissingBlobsRequest", "FindMissingBlobsResponse", False, False),
        "BatchUpdateBlobs": ("BatchUpdateBlobsRequest", "BatchUpdateBlobsResponse", False, False),
        "BatchReadBlobs": ("BatchReadBlobsRequest", "BatchReadBlobsResponse", False, False),
        "GetTree": ("GetTreeRequest", "GetTreeResponse", False, True),
    },
    "build.bazel.remote.execution.v2.Capabilities": {
        "GetCapabilities": ("GetCapabilitiesRequest", "ServerCapabilities", False, False),
    },
    "google.bytestream.ByteStream": {
        "Read": ("ReadRequest", "ReadResponse", False, True),
        "Write": ("WriteRequest", "WriteResponse", True, False),
        "QueryWriteStatus": ("QueryWriteStatusRequest", "QueryWriteStatusResponse", False, False),
    },
}


def _service(full_name: str) -> pb_descriptor.ServiceDescriptor:
    package, _, name = full_name.rpartition(".")
    module = bytestream_pb2 if package == "google.bytestream" else re_pb2
    return module.DESCRIPTOR.services_by_name[name]


@pytest.mark.parametrize("full_name", sorted(SERVICES))
def test_service_methods_match_the_spec(full_name: str) -> None:
    service = _service(full_name)
    package = full_name.rpartition(".")[0]
    methods = {
        m.name: (
            m.input_type.full_name.removeprefix(f"{package}."),
            m.output_type.full_name.removeprefix(f"{package}."),
            m.client_streaming,
            m.server_streaming,
        )
        for m in service.methods
    }
    assert service.full_name == full_name
    assert methods == SERVICES[full_name]


def test_stubs_and_servicers_exist() -> None:
    for name in ("ContentAddressableStorage", "ActionCache", "Capabilities", "Execution"):
        assert callable(getattr(re_grpc, f"{name}Stub"))
        assert callable(getattr(re_grpc, f"add_{name}Servicer_to_server"))
    assert callable(bytestream_pb2_grpc.ByteStreamStub)
    assert callable(bytestream_pb2_grpc.add_ByteStreamServicer_to_server)


# ---------------------------------------------------------------- with googleapis


def test_execute_response_travels_in_a_longrunning_operation() -> None:
    response = re_pb2.ExecuteResponse(
        result=re_pb2.ActionResult(exit_code=3),
        status=status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message="timed out"),
        server_logs={"worker": re_pb2.LogFile(human_readable=True)},
    )
    operation = operations_pb2.Operation(name="operations/1", done=True)
    operation.response.Pack(response)
    operation.metadata.Pack(re_pb2.ExecuteOperationMetadata(stage=re_pb2.ExecutionStage.COMPLETED))
    decoded = operations_pb2.Operation.FromString(operation.SerializeToString())
    assert decoded.response.type_url == (
        "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
    )
    unpacked = re_pb2.ExecuteResponse()
    assert decoded.response.Unpack(unpacked)
    assert unpacked == response


IMPORT_ALL = """
import sys
{first}
{second}
print(sorted(m for m in sys.modules if m.partition(".")[0] == "build" or m == "google.bytestream"))
"""
GOOGLEAPIS = "from google.rpc import status_pb2\nfrom google.longrunning import operations_pb2"
OURS = (
    "from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2, "
    "remote_execution_pb2_grpc\n"
    "from hitz.protos.build.bazel.semver import semver_pb2\n"
    "from hitz.protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc"
)


@pytest.mark.parametrize("ours_first", [True, False], ids=["ours-first", "googleapis-first"])
def test_imports_with_googleapis_in_one_process(ours_first: bool) -> None:
    # A fresh interpreter: a "duplicate file name" clash shows only at first import.
    first, second = (OURS, GOOGLEAPIS) if ours_first else (GOOGLEAPIS, OURS)
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL.format(first=first, second=second)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "imported a top-level `build` or `google.bytestream`"


@pytest.mark.parametrize("name", ["build", "google", "google.bytestream"])
def test_no_top_level_package_comes_from_protos(name: str) -> None:
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec else []
    origins = [*locations, spec.origin] if spec and spec.origin else locations
    protos = REPO / "protos"
    assert not [o for o in origins if Path(o).resolve().is_relative_to(protos)]


# ---------------------------------------------------------------- over a real channel


class _Capabilities(re_grpc.CapabilitiesServicer):
    def __init__(self) -> None:
        self.tool_names: list[str] = []

    def GetCapabilities(self, request, context):
        metadata = dict(context.invocation_metadata())
        details = re_pb2.RequestMetadata.FromString(metadata[REQUEST_METADATA_KEY])
        self.tool_names.append(details.tool_details.tool_name)
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=[re_pb2.DigestFunction.SHA256],
                max_batch_total_size_bytes=4 << 20,
                supported_compressors=[re_pb2.Compressor.ZSTD],
            ),
            low_api_version=semver_pb2.SemVer(major=2),
            high_api_version=semver_pb2.SemVer(major=2, minor=3),
        )


class _ByteStream(bytestream_pb2_grpc.ByteStreamServicer):
    def Read(self, request, context):
        data = request.resource_name.encode()
        for start in range(0, len(data), 4):
            yield bytestream_pb2.ReadResponse(data=data[start : start + 4])


class _MethodRecorder(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_service(self, continuation, handler_call_details):
        self.methods.append(handler_call_details.method)
        return continuation(handler_call_details)


def test_stubs_talk_to_a_server_on_the_spec_method_paths() -> None:
    capabilities, recorder = _Capabilities(), _MethodRecorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[recorder])
    re_grpc.add_CapabilitiesServicer_to_server(capabilities, server)
    bytestream_pb2_grpc.add_ByteStreamServicer_to_server(_ByteStream(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            metadata = re_pb2.RequestMetadata(tool_details=re_pb2.ToolDetails(tool_name="hitz"))
            caps = re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(instance_name="main"),
                metadata=[(REQUEST_METADATA_KEY, metadata.SerializeToString())],
                timeout=10,
            )
            chunks = bytestream_pb2_grpc.ByteStreamStub(channel).Read(
                bytestream_pb2.ReadRequest(resource_name="main/blobs/abc/3"), timeout=10
            )
            data = b"".join(chunk.data for chunk in chunks)
    finally:
        server.stop(grace=None)
    assert recorder.methods == [
        "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
        "/google.bytestream.ByteStream/Read",
    ]
    assert capabilities.tool_names == ["hitz"]
    assert caps.cache_capabilities.max_batch_total_size_bytes == 4 << 20
    assert list(caps.cache_capabilities.supported_compressors) == [re_pb2.Compressor.ZSTD]
    assert (caps.high_api_version.major, caps.high_api_version.minor) == (2, 3)
    assert data == b"main/blobs/abc/3"
