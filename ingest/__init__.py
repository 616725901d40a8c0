"""DynamoDB sources: decoding DynamoDB JSON, bulk load by Scan, the stream reader, and the
pipeline that runs them for one collection."""
