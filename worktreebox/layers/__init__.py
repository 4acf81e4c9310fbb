"""What boxes share, built once per recipe: pristine trees, dependency layers, download caches."""
