output "worker_groups" {
  description = "Per group: its managed instance group, instance template and autoscaler, and the filter of its metric."
  value = {
    for name, g in var.worker_groups : name => {
      instance_group_manager = google_compute_region_instance_group_manager.workers[name].name
      instance_group         = google_compute_region_instance_group_manager.workers[name].instance_group
      instance_template      = google_compute_region_instance_template.workers[name].name
      autoscaler             = google_compute_region_autoscaler.workers[name].name
      min_workers            = g.min_workers
      max_workers            = g.max_workers
      service_account        = local.worker_sa[name]
    }
  }
}

output "demand_metric" {
  description = "The Cloud Monitoring metric the autoscalers read (queued + running jobs per queue)."
  value       = local.demand_metric
}

output "internal_lb_address" {
  description = "Internal address of the workers' /metrics (null without the internal load balancer)."
  value       = var.internal_lb ? local.workers_target : null
}

output "collector_instance" {
  description = "The OpenTelemetry collector VM (its zone and name)."
  value       = "${google_compute_instance.collector.zone}/${google_compute_instance.collector.name}"
}

output "collector_service_account" {
  description = "The collector's service account."
  value       = google_service_account.collector.email
}
