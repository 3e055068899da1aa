//! The canonical field and everything that reads it: voxel grids, the differentiable volume
//! renderer, meshes in and out, and marching cubes.

pub mod canonical;
pub mod fused;
pub mod marching_cubes;
pub mod mesh;
pub mod render;
pub mod voxel;

use crate::error::Result;
use canonical::CanonicalField;
use mesh::TriangleMesh;

/// Extracts the field's surface (occupancy 0.5) by marching cubes, in canonical units, coloured.
pub fn field_mesh(field: &CanonicalField) -> Result<TriangleMesh> {
    let occupancy: Vec<f32> = field.density_host()?.iter().map(|d| d / field.density_per_occupancy).collect();
    let colors = field.colour_host()?;
    let s = field.units_per_normalised as f32;
    let grid = voxel::VoxelGrid {
        dims: field.dims,
        bbox_min: field.grid_min.map(|v| v * s),
        bbox_max: field.grid_max.map(|v| v * s),
        occupancy,
        colors,
    };
    let mut mesh = marching_cubes::marching_cubes(&grid.occupancy, grid.dims, grid.bbox_min, grid.bbox_max, 0.5);
    marching_cubes::colorize(&mut mesh, &grid);
    Ok(mesh)
}
