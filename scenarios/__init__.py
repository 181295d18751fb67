"""The shipped scenario catalogue (package data)."""
