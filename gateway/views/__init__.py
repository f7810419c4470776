"""Thin Flask views: parse the request, call the domain code, render the answer."""
