"""Each association's copy of the broker SCP's supported contexts (`scp._Contexts`)."""

from __future__ import annotations

import copy

from broker.dicom.scp import BrokerSCP, SCPConfig, _Contexts


def test_the_copy_is_the_contexts_and_independent_of_them() -> None:
    ae = BrokerSCP(SCPConfig(ae_title="RELAIS", bind="127.0.0.1", port=0)).application_entity()
    original = _Contexts(ae.supported_contexts)
    original[0].scp_role = True
    copies = copy.deepcopy(original)
    assert [vars(c) for c in copies] == [vars(c) for c in copy.deepcopy(list(original))]
    copies[0].transfer_syntax = ["1.2.840.10008.1.2"]
    copies[1].context_id = 7
    assert original[0].transfer_syntax != ["1.2.840.10008.1.2"]
    assert original[1].context_id is None
    assert all(a is not b for a, b in zip(copies, original, strict=True))


def test_the_server_hands_each_association_the_cheap_copy() -> None:
    scp = BrokerSCP(SCPConfig(ae_title="RELAIS", bind="127.0.0.1", port=0))
    server = scp.start(block=False)
    assert server is not None
    try:
        assert isinstance(server.contexts, _Contexts)
        assert len(server.contexts) == len(scp.application_entity().supported_contexts)
    finally:
        scp.shutdown()
