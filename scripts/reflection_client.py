#!/usr/bin/env python3
"""A client that knows nothing of chat.proto: it discovers the service through
server reflection (Python's stock grpcio + grpcio-reflection), builds the
message types at run time, and calls it. Used by
crates/chat-grpc-server/tests/python_reflection.rs to prove that stock gRPC
tools in another language can discover and call the server.

Usage: reflection_client.py HOST:PORT
Prints one line per check and exits non-zero on the first failure.
"""
import sys

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass


def main(addr: str) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    channel = grpc.insecure_channel(addr)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert "chat.v1.Chat" in services, services
    print("services:", " ".join(sorted(services)))

    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("chat.v1.Chat")
    methods = {m.name: m for m in service.methods}

    def unary(name, **fields):
        method = methods[name]
        request_type = GetMessageClass(method.input_type)
        reply_type = GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/chat.v1.Chat/{name}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=reply_type.FromString,
        )
        return call(request_type(**fields))

    reply = unary("CreateAccount", username="py", password="a python password")
    assert reply.state.username == "py" and len(reply.token) == 80, reply
    print("created py with a token")

    listed = unary("ListAccounts", pattern="^p", max=0)
    assert list(listed.usernames) == ["py"], listed
    print("listed:", " ".join(listed.usernames))

    try:
        unary("CreateAccount", username="py", password="a python password")
        raise AssertionError("a duplicate create succeeded")
    except grpc.RpcError as err:
        code = dict(err.trailing_metadata()).get("chat-error-code")
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.code()
        assert code == "username_taken", code
        print("duplicate create:", err.code().name, code)


if __name__ == "__main__":
    main(sys.argv[1])
