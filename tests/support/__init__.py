"""Test helpers shared across test modules: real loopback servers and a faulty upstream."""
