"""Exports of a grid for your own deployment tools: Terraform (GCP) and Kubernetes manifests."""
