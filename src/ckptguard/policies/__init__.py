"""Policies that decide (what to keep, when to save, when to stop, what is pinned); they never delete."""
