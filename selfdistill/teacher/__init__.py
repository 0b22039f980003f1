"""The self-teacher: the policy itself, shown privileged context, scoring the student's tokens."""
