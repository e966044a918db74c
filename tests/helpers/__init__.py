"""Shared builders and checks for the pp_media test suite (import as ``tests.helpers``)."""
