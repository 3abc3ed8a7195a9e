/** The version of @tickmesh/sdk announced in hello. */
export const SDK_VERSION = "0.1.0";
