"""The Kubernetes launcher: build, submit and watch the job's objects."""
