"""The developer and user commands around the pipeline: the `freezecache` CLI, dvc.yaml
rendering, the codec sweep."""
