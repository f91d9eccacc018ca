"""Generated from proto/chargpt/v1/*.proto; see tests/test_proto.py. Do not edit."""
