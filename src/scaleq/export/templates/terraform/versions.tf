terraform {
  # optional() object attributes need 1.3; terraform_data needs 1.4. OpenTofu 1.6+ works too.
  required_version = ">= 1.4"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }
}
