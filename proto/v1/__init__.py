"""Generated code for protobuf package ``gradwatch.v1`` (do not edit)."""
