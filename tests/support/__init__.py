"""Test support code (not collected as tests): helpers shared by integration and chaos tests."""
