//! OCI bundle logic for shoal. Empty until the shim issue (#5) brings bundle loading.
