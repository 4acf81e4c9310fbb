"""The pieces a box is made of. Each module holds one resource: create, destroy, discover."""
