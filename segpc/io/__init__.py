"""Reading and writing: images, object storage, inputs, the SegPC format, the job's outputs."""
