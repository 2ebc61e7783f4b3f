"""Real peers for the test suite: Orthanc archives loaded with synthetic studies."""
